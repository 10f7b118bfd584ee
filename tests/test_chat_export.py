"""`alignpipe chat` (through stdin and a pseudo-terminal), `alignpipe generate`, and `alignpipe export`
of a LoRA stage into a standalone model that plain transformers loads with the same logits."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignpipe.cli import main
from alignpipe.models.loading import load_stage_model, load_tokenizer
from alignpipe.recipe.schema import ModelSpec
from conftest import REPO, tiny_recipe, write_yaml

pytestmark = pytest.mark.slow  # every test here trains a model


CHAT = [sys.executable, "-m", "alignpipe.cli", "chat"]


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory):
    """A tiny pretrain + LoRA sft run; the sft stage's model/ holds only an adapter."""
    root = tmp_path_factory.mktemp("chat")
    data = tiny_recipe(root / "runs")
    sft = data["stages"]["sft"]
    sft["lora"] = {"r": 4, "alpha": 8}
    sft["trainer"].update(max_steps=20, learning_rate=2e-2)  # big enough to move the adapter visibly
    sft["eval"] = {"enabled": False}
    assert main(["run", str(write_yaml(root / "tiny.yaml", data))]) == 0
    stage = root / "runs" / "tiny" / "sft"
    assert (stage / "model" / "adapter_config.json").is_file()
    return stage


def greedy_reply(model, tok, messages, max_new_tokens):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def replies(stdout: str) -> list[str]:
    return [seg.split("assistant> ", 1)[1].strip() for seg in stdout.split("you> ") if "assistant> " in seg]


def test_chat_answers_typed_turns_through_stdin(lora_sft, monkeypatch, capsys):
    turns = ["what is 2 plus 3?", "reverse the word cat."]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n/quit\n"))
    capsys.readouterr()
    assert main(["chat", str(lora_sft), "--max-new-tokens", "12"]) == 0
    got = replies(capsys.readouterr().out)
    assert len(got) == 2 and all(got), got

    # each turn is the model's greedy answer to the whole conversation so far (multi-turn, chat template)
    spec = ModelSpec()
    model, tok = load_stage_model(lora_sft, spec).eval(), load_tokenizer(lora_sft / "model", spec)
    first = greedy_reply(model, tok, [{"role": "user", "content": turns[0]}], 12)
    second = greedy_reply(model, tok, [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first},
                                       {"role": "user", "content": turns[1]}], 12)
    assert got == [first, second]


def test_chat_in_a_terminal(lora_sft):
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([*CHAT, str(lora_sft), "--max-new-tokens", "8"], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=REPO, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, count: int, timeout: float = 120) -> None:
        nonlocal seen
        end = time.time() + timeout
        while seen.count(marker) < count and time.time() < end:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert seen.count(marker) >= count, seen.decode(errors="replace")

    try:
        read_until(b"you> ", 1)
        os.write(master, b"what is 2 plus 3?\n")
        read_until(b"you> ", 2)
        os.write(master, b"\x04")  # Ctrl-D ends the chat
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert "what is 2 plus 3?" in text  # the terminal echoed the typed turn
    answer = text.split("assistant> ", 1)[1].split("you> ")[0].strip()
    assert answer, text  # and the model answered it


def test_generate_answers_a_prompt_file(lora_sft, tmp_path, capsys):
    rows = [{"prompt": "what is 2 plus 3?", "id": 1}, {"prompt": "count the letters in dog.", "id": 2},
            {"messages": [{"role": "user", "content": "reverse the word cat."}], "id": 3}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(lora_sft), "--in", str(tmp_path / "in.jsonl"), "--out", str(out),
                 "--max-new-tokens", "10"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, 2, 3]
    spec = ModelSpec()
    model, tok = load_stage_model(lora_sft, spec).eval(), load_tokenizer(lora_sft / "model", spec)
    for row, g in zip(rows, got):  # batched, left-padded generation gives the unbatched greedy answer
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        assert g["response"] == greedy_reply(model, tok, messages, 10)
        assert 0 < g["tokens"] <= 10 and isinstance(g["ended"], bool)

    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    assert main(["generate", str(lora_sft), "--in", str(tmp_path / "bad.jsonl"), "--out", str(out)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_generate_answers_mt_bench_turns_in_order(lora_sft, tmp_path):
    rows = [{"question_id": 81, "category": "math", "turns": ["what is 2 plus 3?", "and 4 plus 4?"]},
            {"prompt": "reverse the word cat.", "id": 2}]
    (tmp_path / "mt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(lora_sft), "--in", str(tmp_path / "mt.jsonl"), "--out", str(out),
                 "--max-new-tokens", "8"]) == 0
    first, plain = [json.loads(line) for line in out.read_text().splitlines()]
    spec = ModelSpec()
    model, tok = load_stage_model(lora_sft, spec).eval(), load_tokenizer(lora_sft / "model", spec)
    # each turn is answered with the earlier turns and replies before it, as a chat would
    one = greedy_reply(model, tok, [{"role": "user", "content": "what is 2 plus 3?"}], 8)
    two = greedy_reply(model, tok, [{"role": "user", "content": "what is 2 plus 3?"},
                                    {"role": "assistant", "content": one},
                                    {"role": "user", "content": "and 4 plus 4?"}], 8)
    assert first["question_id"] == 81 and first["responses"] == [one, two] and first["response"] == two
    assert len(first["tokens_per_turn"]) == 2
    assert plain["response"] == greedy_reply(model, tok, [{"role": "user", "content": "reverse the word cat."}], 8)


def _logits(model, tok, text="<|user|>what is 2 plus 3?<|end|><|assistant|>The answer is"):
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_merges_lora_into_a_standalone_model(lora_sft, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(lora_sft), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged LoRA adapter" in printed and "max |logit difference|" in printed

    # a plain transformers folder: safetensors weights, tokenizer, chat template; no adapter
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|user|>hi<|end|><|assistant|>"

    # same logits as the adapter on its base; different from the base alone (the adapter was merged)
    adapter = load_stage_model(lora_sft, ModelSpec(), merge=False).eval()
    base = load_stage_model(lora_sft.parent / "pretrain", ModelSpec()).eval()
    exported, reference = _logits(model, tok), _logits(adapter, tok)
    assert (exported - reference).abs().max() < 1e-4
    assert (exported - _logits(base, tok)).abs().max() > 1e-2
    record = json.loads((out / "alignpipe_export.json").read_text())
    assert record["lora_merged"] is True and record["max_abs_logit_diff"] < 1e-4

    # never writes into a non-empty folder
    assert main(["export", str(lora_sft), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_export_refuses_a_quantised_base_unless_dequantised(lora_sft, tmp_path, capsys):
    run_root = tmp_path / "runs" / "tiny"
    shutil.copytree(lora_sft.parent, run_root)  # the whole run folder: a LoRA stage's base is found beside it
    stage = run_root / "sft_q"
    shutil.copytree(run_root / "sft", stage)
    manifest = json.loads((stage / "manifest.json").read_text())
    manifest["recipe_settings"]["model"]["load_in_4bit"] = True  # as a QLoRA recipe records it
    (stage / "manifest.json").write_text(json.dumps(manifest))

    assert main(["export", str(stage), str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "quantised" in err and "--dequantize" in err
    assert not (tmp_path / "q").exists()

    assert main(["export", str(stage), str(tmp_path / "q"), "--dequantize"]) == 0
    record = json.loads((tmp_path / "q" / "alignpipe_export.json").read_text())
    assert record["dequantized_from"].startswith("4-bit") and record["max_abs_logit_diff"] < 1e-4
