"""Bringing an own model, as a new user would: a tiny Qwen2 look-alike from `alignpipe tiny-model` (EOS
<|endoftext|>, as Qwen base models ship), the chatml template (a turn ends with <|im_end|>), LoRA, user
data files. Its export stops where a turn ends under plain transformers; DPO's counts are the pairs it
trains on; validate refuses what run refuses, and a refused run leaves no folder behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignpipe.cli import main
from alignpipe.models.tiny import arithmetic
from alignpipe.runfolder.manifests import read_manifest
from conftest import write_yaml

TRAINER = {"per_device_train_batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 0, "logging_steps": 1}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """`alignpipe tiny-model --like qwen2`, its tokenizer trained on a text file."""
    root = tmp_path_factory.mktemp("byo")
    text = root / "text.txt"
    text.write_text("".join(f"{q} {r} {w} zanzibar\n" for q, r, w in arithmetic(200)))
    out = root / "tiny-qwen2"
    assert main(["tiny-model", "--like", "qwen2", "--out", str(out), "--text", str(text)]) == 0
    return out


def recipe(folder: Path, model_dir: Path, stages: dict, name: str = "byo") -> Path:
    data = {"name": name, "seed": 0, "runs_dir": str(folder / "runs"), "model": {"path": str(model_dir)},
            "chat_template": "chatml", "stages": stages}
    return write_yaml(folder / f"{name}.yaml", data)


def sft_stage(folder: Path) -> dict:
    chat = folder / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": r}]}) + "\n"
                            for q, r, _ in arithmetic(64)))
    return {"data": {"path": str(chat)}, "lora": {"r": 4, "alpha": 8},
            "trainer": {**TRAINER, "max_steps": 3, "max_length": 64}}


def write_prefs(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": q, "chosen": r, "rejected": w}) + "\n"
                            for q, r, w in arithmetic(32)))
    return path


@pytest.fixture(scope="module")
def lora_sft(qwen_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byo_sft")
    assert main(["run", str(recipe(root, qwen_dir, {"sft": sft_stage(root)}))]) == 0
    return root / "runs" / "byo" / "sft"


# --- item 7: a tiny look-alike on the command line ---------------------------------------------------


@pytest.mark.slow
def test_tiny_model_command_writes_a_hub_layout_lookalike(qwen_dir, tmp_path, capsys):
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(qwen_dir).model_type == "qwen2"
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    assert tok.eos_token == "<|endoftext|>" and "<|im_end|>" in tok.get_vocab()
    assert len(tok.tokenize(" zanzibar")) == 1  # the tokenizer was trained on the given text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert main(["tiny-model", "--like", "llama", "--out", str(qwen_dir)]) == 2  # never over a model
    assert "not empty" in capsys.readouterr().err


# --- item 1: the export stops where a turn ends --------------------------------------------------------


@pytest.mark.slow
def test_export_of_a_lora_stage_stops_at_the_end_of_turn(lora_sft, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    out = tmp_path / "export"
    assert main(["export", str(lora_sft), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == im_end
    assert im_end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]

    class EndTurnAt(LogitsProcessor):
        """The model writes <|im_end|> as its 3rd token (and never the old EOS): where does generate stop?"""

        def __call__(self, input_ids, scores):
            scores[:, endoftext] = -math.inf
            if input_ids.shape[1] - prompt_len == 2:
                scores[:, :] = -math.inf
                scores[:, im_end] = 0.0
            return scores

    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    prompt_len = ids.shape[1]
    with torch.no_grad():  # plain transformers: the folder's own generation config decides where to stop
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                             logits_processor=LogitsProcessorList([EndTurnAt()]))
    new = gen[0, prompt_len:].tolist()
    assert new[-1] == im_end and len(new) == 3, tok.decode(new)


# --- item 2: DPO's counts are the pairs it trains on ----------------------------------------------------


@pytest.mark.slow
def test_dpo_reports_the_pairs_it_trains_on(qwen_dir, tmp_path, capsys):
    rows = arithmetic(64, seed=1)
    long_at = {0, 10, 20, 30, 40}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": " ".join([q] * 12) if i in long_at else q, "chosen": r,
                                         "rejected": w}) + "\n" for i, (q, r, w) in enumerate(rows)))
    dpo = {"data": {"path": str(prefs)}, "lora": {"r": 4, "alpha": 8},
           "trainer": {**TRAINER, "max_steps": -1, "num_train_epochs": 1, "max_length": 64}}
    path = recipe(tmp_path, qwen_dir, {"dpo": dpo})
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    metrics = read_manifest(tmp_path / "runs" / "byo" / "dpo")["metrics"]
    # 64 pairs, 5 of them with a prompt of >64 tokens, split by the recipe's held-out prompts
    trained, held = metrics["pairs_trained_on"], metrics["pairs_held_out"]
    assert metrics["pairs_dropped_prompt_too_long"] == 5
    assert trained + held + 5 == 64 and held > 0
    assert metrics["global_step"] == math.ceil(trained / 8)  # one epoch over exactly the pairs reported
    assert f"{trained} pairs trained on, {held} held out; dropped " in out, out
    assert out.count("data (pairs): 64 rows read") == 1, out  # the data summary is printed once


# --- item 3: validate refuses what run refuses ------------------------------------------------------


@pytest.mark.parametrize("template,refusal", [
    ("llama3", "neither the tokenizer's EOS nor a generation stop token"),  # <|eot_id|> is not even a token here
    ("model", "marks no assistant tokens"),  # Qwen's own template has no {% generation %} block
])
def test_validate_refuses_what_run_refuses_and_run_leaves_no_folder(qwen_dir, tmp_path, capsys, template, refusal):
    dpo = {"from": "sft", "data": {"path": str(write_prefs(tmp_path / "prefs.jsonl"))}}
    path = recipe(tmp_path, qwen_dir, {"sft": sft_stage(tmp_path), "dpo": dpo})
    for command in ("validate", "run"):
        capsys.readouterr()
        assert main([command, str(path), "--set", f"chat_template={template}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert refusal in err and "stage 'sft'" in err and "fix:" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_validate_checks_a_complete_parent_as_run_does(lora_sft, qwen_dir, tmp_path, capsys):
    import shutil

    root = lora_sft.parents[2]  # the fixture's folder: its recipe and data
    runs = tmp_path / "runs"
    shutil.copytree(lora_sft.parent, runs / "byo")
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    data = {**__import__("yaml").safe_load((root / "byo.yaml").read_text()), "runs_dir": str(runs)}
    data["stages"]["dpo"] = {"from": "sft", "data": {"path": str(prefs)}, "lora": {"r": 4, "alpha": 8}}
    path = write_yaml(tmp_path / "byo.yaml", data)
    assert main(["validate", str(path)]) == 0
    # the parent's tokenizer changed after it completed: run would refuse, so validate does
    tok_file = runs / "byo" / "sft" / "model" / "tokenizer.json"
    tok_file.write_text(tok_file.read_text() + "\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tokenizer.json of stage 'sft' changed after that stage completed" in err, err


# --- item 6: the smaller ones ----------------------------------------------------------------------


def test_show_lists_stages_in_recipe_order_with_dpo_implicit_accuracy(tmp_path, capsys):
    from alignpipe.runfolder.files import write_json_atomic

    path = write_yaml(tmp_path / "r.yaml", {"name": "r", "stages": {"sft": {}, "reward": {}, "dpo": {}}})
    metrics = {"sft": {"eval_loss": 1.5}, "reward": {"pairwise_accuracy": 0.9}, "dpo": {"implicit_accuracy": 0.75}}
    for i, (name, m) in enumerate(metrics.items()):
        write_json_atomic(tmp_path / "runs" / name / "manifest.json",
                          {"stage": name, "kind": name, "status": "complete", "recipe": str(path), "metrics": m,
                           "started_at": f"2026-01-01T00:00:0{9 - i}", "wall_time_s": 1.0})
    assert main(["show", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out.splitlines()
    # alphabetical (dpo, reward, sft) or by start time (dpo first) would differ: the recipe's order
    assert [line.split(":")[0] for line in out[:3]] == ["sft", "reward", "dpo"], out
    assert [line.split()[0] for line in out[-3:]] == ["sft", "reward", "dpo"], out
    assert "implicit_accuracy" in out[3] and out[-1].split()[-1] == "0.750", out


@pytest.mark.slow
def test_model_path_at_a_lora_stage_points_to_export_or_from(lora_sft, tmp_path, capsys):
    for folder in (lora_sft, lora_sft / "model"):
        path = recipe(tmp_path, folder, {"sft": sft_stage(tmp_path)}, name="again")
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "is an alignpipe stage" in err and "from: sft" in err and f"alignpipe export {lora_sft} OUT" in err


def test_a_missing_absolute_data_path_is_not_blamed_on_relative_resolution(qwen_dir, tmp_path, capsys):
    path = recipe(tmp_path, qwen_dir, {"sft": {"data": {"path": str(tmp_path / "nope.jsonl")}}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "no such file or folder" in err and "relative paths" not in err, err


def test_continued_pretraining_trains_on_end_of_document_where_the_model_pads_with_eos(tmp_path):
    """A base model without a pad token is given EOS as one (as most are); the packed pretraining blocks must
    still be trained to predict EOS where each document ends, not have it masked as padding."""
    from alignpipe.models import loading as modeling
    from alignpipe.stages.helpers import pack
    from alignpipe.stages.pretrain import block_collator

    folder = tmp_path / "tok"
    tok = modeling.train_tokenizer(["one two three", "four five"], 300, [], "", None)
    tok.pad_token = None
    tok.save_pretrained(folder)
    tok = modeling.load_tokenizer(folder)
    assert tok.pad_token_id == tok.eos_token_id  # the fallback most base models get
    docs = [d + [tok.eos_token_id] for d in tok(["one two three", "four five"] * 4)["input_ids"]]
    batch = block_collator([{"input_ids": b} for b in pack(docs, 8)])
    assert (batch["input_ids"] == tok.eos_token_id).any()
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())
