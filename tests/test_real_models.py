"""The real-model path, offline: a tiny Qwen2 saved in hub layout (`model: {path: <folder>}`), user data
files, the chatml template, LoRA; sft -> dpo run through the same code a hub model takes, and so do the
shipped real-model recipes (every stage, their own settings shrunk) on local look-alikes of their hub
datasets. Also: hub models/datasets validate offline, and running one offline fails at once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.recipe.templates import CHATML
from alignpipe.runfolder.manifests import read_manifest
from conftest import write_yaml
from hub_layout import arithmetic, save_tiny_model

TRAINER = {"per_device_train_batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 0, "logging_steps": 1}


def write_data(folder: Path) -> tuple[Path, Path]:
    rows = arithmetic(96)
    sft = folder / "chat.jsonl"  # OpenAI-style messages
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": r}]}) + "\n"
                           for q, r, _ in rows))
    pairs = folder / "prefs.jsonl"  # prompt/chosen/rejected strings
    pairs.write_text("".join(json.dumps({"prompt": q, "chosen": r, "rejected": w}) + "\n" for q, r, w in rows))
    return sft, pairs


def real_recipe(folder: Path, model_dir: Path, stages: list[str]) -> dict:
    sft, pairs = write_data(folder)
    lora = {"r": 4, "alpha": 8}
    all_stages = {
        "sft": {"data": {"path": str(sft)}, "lora": lora,
                "trainer": {**TRAINER, "max_steps": 6, "max_length": 64}},
        "reward": {"from": "sft", "data": {"path": str(pairs)}, "lora": lora, "eval_pairs": 16,
                   "trainer": {**TRAINER, "max_steps": 4, "max_length": 64}},
        "dpo": {"from": "sft", "data": {"path": str(pairs)}, "lora": lora,
                "trainer": {**TRAINER, "max_steps": 4, "max_length": 64}},
    }
    return {"name": "real", "seed": 0, "runs_dir": str(folder / "runs"), "model": {"path": str(model_dir)},
            "chat_template": "chatml", "stages": {k: v for k, v in all_stages.items() if k in stages}}


@pytest.fixture(scope="module")
def model_dir(tiny_hub_model) -> Path:
    return tiny_hub_model  # the session's, built once


@pytest.mark.slow
def test_saved_in_hub_layout(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2"


@pytest.mark.slow
def test_sft_lora_then_dpo(model_dir, tmp_path):
    import torch

    from alignpipe.models.loading import load_pretrained, load_stage_model, load_tokenizer
    from alignpipe.recipe.schema import ModelSpec

    path = write_yaml(tmp_path / "real.yaml", real_recipe(tmp_path, model_dir, ["sft", "dpo"]))
    assert main(["validate", str(path)]) == 0
    t0 = time.time()
    assert main(["run", str(path)]) == 0
    print(f"real-model path (sft, dpo): {time.time() - t0:.1f}s")
    runs = tmp_path / "runs" / "real"

    sft = read_manifest(runs / "sft")
    assert sft["status"] == "complete" and sft["base_model"] == {"path": str(model_dir)}
    assert (runs / "sft" / "model" / "adapter_config.json").is_file()  # LoRA: only the adapter is saved
    assert sft["metrics"]["train_loss"] < sft["metrics"]["train_loss_first"]
    check = sft["template_check"]
    assert check["end_of_turn"] == "<|im_end|>" and check["assistant_mask"]["turns"] == 2

    # the saved tokenizer carries the recipe's template and stops at the end of a turn
    tok = load_tokenizer(runs / "sft" / "model")
    assert tok.chat_template.strip() == CHATML.strip()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # the user file's validation report counts tokens after the template, and truncations at max_length
    data_report = json.loads((runs / "sft" / "data_report.json").read_text())
    assert data_report["rows_kept"] == 96 and data_report["tokens"]["max_length"] == 64
    assert 10 < data_report["tokens"]["median"] < 64 and data_report["tokens"]["truncated"] == 0

    # base + adapter reloads, and training moved the weights
    spec = ModelSpec(path=str(model_dir))
    base = load_pretrained(model_dir, spec)
    tuned = load_stage_model(runs / "sft", spec)
    moved = max((a - b).abs().max().item() for a, b in zip(base.parameters(), tuned.parameters()))
    assert moved > 1e-4

    dpo = read_manifest(runs / "dpo")
    assert dpo["status"] == "complete" and dpo["lineage"] == ["sft"]
    assert (runs / "dpo" / "model" / "adapter_config.json").is_file()
    policy = load_stage_model(runs / "dpo", spec)  # base -> sft adapter -> dpo adapter
    after_sft = dict(tuned.named_parameters())
    assert any(not torch.equal(p, after_sft[n]) for n, p in policy.named_parameters())


@pytest.mark.slow
def test_qwen_own_template_refused_for_assistant_only_sft(model_dir, tmp_path, capsys):
    recipe = real_recipe(tmp_path, model_dir, ["sft"])
    recipe["chat_template"] = "model"  # Qwen's own template has no {% generation %} markers
    path = write_yaml(tmp_path / "own.yaml", recipe)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "marks no assistant tokens" in err and "assistant_only_loss: false" in err, err
    assert not (tmp_path / "runs" / "real" / "sft" / "manifest.json").exists()


# --- hub ids: validate offline, run fails fast ----------------------------------------------------


@pytest.mark.slow
def test_hub_recipe_validates_offline_and_run_fails_fast(tmp_path, capsys, monkeypatch):
    from alignpipe.data.sources import probe_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # no network, but not declared offline either
    recipe = {"name": "hub", "runs_dir": str(tmp_path / "runs"), "model": {"path": "Qwen/Qwen2.5-0.5B"},
              "chat_template": "chatml",
              "stages": {"sft": {"data": {"hub": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}}}}
    path = write_yaml(tmp_path / "hub.yaml", recipe)
    assert main(["validate", str(path)]) == 0  # never reaches the hub
    err = capsys.readouterr().err
    assert "hub model Qwen/Qwen2.5-0.5B is downloaded when a stage runs" in err
    assert "hub dataset HuggingFaceH4/ultrachat_200k is downloaded when the stage runs" in err

    if probe_hub() is None:
        pytest.skip("the hub is reachable from here: `run` would download the model")
    t0 = time.time()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert time.time() - t0 < 30
    assert "Qwen/Qwen2.5-0.5B" in err and "hub is not reachable" in err and "fix:" in err, err
    assert not (tmp_path / "runs" / "hub" / "sft").exists()


def test_hub_model_declared_offline_fails_at_once(monkeypatch):
    from alignpipe.errors import AlignpipeError
    from alignpipe.models.loading import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(AlignpipeError, match="HF_HUB_OFFLINE is set"):
        load_tokenizer("Qwen/Qwen2.5-0.5B")
    assert time.time() - t0 < 10


@pytest.mark.parametrize("bad", ["./no/such/folder", "not a hub id", "a/b/c"])
def test_model_path_that_is_neither_folder_nor_hub_id(tmp_path, capsys, bad):
    recipe = {"name": "x", "runs_dir": str(tmp_path / "runs"), "model": {"path": bad}, "chat_template": "chatml",
              "stages": {"sft": {"data": {"hub": "org/name"}}}}
    assert main(["validate", str(write_yaml(tmp_path / "x.yaml", recipe))]) == 2
    assert "model.path" in capsys.readouterr().err


def test_bad_hub_dataset_id_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    recipe = {"name": "x", "runs_dir": str(tmp_path / "runs"), "model": {"path": "org/model"}, "chat_template": "chatml",
              "stages": {"sft": {"data": {"hub": "no spaces/allowed here"}}}}
    assert main(["validate", str(write_yaml(tmp_path / "x.yaml", recipe))]) == 2
    assert "stages.sft.data.hub" in capsys.readouterr().err


def test_quantized_loading_needs_a_gpu():
    import torch

    from alignpipe.errors import AlignpipeError
    from alignpipe.models.loading import load_kwargs
    from alignpipe.recipe.schema import ModelSpec

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(AlignpipeError, match="load_in_4bit needs a CUDA GPU"):
        load_kwargs(ModelSpec(path="org/model", load_in_4bit=True))


# --- the shipped real-model recipes, run on the tiny model with local look-alikes of their datasets ------


def hub_lookalikes(folder: Path) -> dict[str, Path]:
    """Local files with the columns of the hub datasets the shipped recipes name."""
    rows = arithmetic(64, seed=1)
    msgs = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    shapes = {
        "HuggingFaceH4/ultrachat_200k": [{"prompt": q, "prompt_id": str(i), "messages": msgs(q, r)}
                                         for i, (q, r, _) in enumerate(rows)],
        "HuggingFaceH4/ultrafeedback_binarized": [
            {"prompt": q, "prompt_id": str(i), "chosen": msgs(q, r), "rejected": msgs(q, w), "messages": msgs(q, r),
             "score_chosen": 8.0, "score_rejected": 3.0} for i, (q, r, w) in enumerate(rows)],
        "trl-lib/ultrafeedback-prompt": [{"prompt": [{"role": "user", "content": q}]} for q, _, _ in rows],
    }
    out = {"gsm8k": folder / "gsm8k_test.jsonl"}
    out["gsm8k"].write_text("".join(json.dumps({"question": q, "answer": f"{r}\n#### {r.split()[-1].rstrip('.')}"})
                                    + "\n" for q, r, _ in rows[:8]))
    for hub, data in shapes.items():
        out[hub] = folder / (hub.replace("/", "__") + ".jsonl")
        out[hub].write_text("".join(json.dumps(r) + "\n" for r in data))
    return out


SHRINK = {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
          "per_device_eval_batch_size": 4, "max_length": 64, "warmup_steps": 0, "logging_steps": 1,
          "total_updates": 2, "rollout_batch_size": 8, "minibatch_size": 4, "micro_batch_size": 2,
          "forward_batch_size": 4, "max_new_tokens": 8}


@pytest.mark.slow
@pytest.mark.parametrize("name,arch", [("qwen2.5-0.5b-lora", "qwen2"), ("llama3-8b-qlora", "llama")])
def test_shipped_recipe_runs_on_a_tiny_lookalike(name, arch, tmp_path):
    import yaml

    from conftest import REPO

    recipe = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    files = hub_lookalikes(tmp_path)
    recipe["model"]["path"] = str(save_tiny_model(tmp_path / "model", arch))
    recipe["model"]["load_in_4bit"] = False  # bitsandbytes needs a GPU; everything else is the recipe's own
    recipe["runs_dir"] = str(tmp_path / "runs")
    for stage in recipe["stages"].values():
        stage["data"] = {"path": str(files[stage["data"]["hub"]])}
        stage["trainer"] = {k: SHRINK.get(k, v) for k, v in stage["trainer"].items()}
        if "eval_pairs" in stage:
            stage["eval_pairs"] = 8
        if "eval" in stage:  # the recipe's GSM8K file: a look-alike, and a short evaluation
            stage["eval"] = {**stage["eval"], "prompts": str(files["gsm8k"]), "num_prompts": 4, "samples_per_prompt": 1,
                             "max_new_tokens": 8, "batch_size": 4}
    path = write_yaml(tmp_path / f"{name}.yaml", recipe)
    assert main(["run", str(path)]) == 0
    for stage in recipe["stages"]:
        manifest = read_manifest(tmp_path / "runs" / recipe["name"] / stage)
        assert manifest["status"] == "complete", stage
        if "eval" in recipe["stages"][stage]:  # the recipe's evaluation block ran
            assert manifest["metrics"]["eval_status"] == "complete" and "gsm8k_pass_rate" in manifest["metrics"]
        check = manifest["template_check"]
        assert check["end_of_turn"] == {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[arch]
        assert check["assistant_mask"] == ({"turns": 2, "tokens": check["assistant_mask"]["tokens"]}
                                           if stage == "sft" else "not used by this stage")


def test_flash_attention_needs_its_package():
    import importlib.util

    from alignpipe.errors import AlignpipeError
    from alignpipe.models.loading import load_kwargs
    from alignpipe.recipe.schema import ModelSpec

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(AlignpipeError, match="needs the flash-attn package"):
        load_kwargs(ModelSpec(path="org/model", attn_implementation="flash_attention_2"))
    assert load_kwargs(ModelSpec(path="org/model", attn_implementation="sdpa"))["attn_implementation"] == "sdpa"
