"""A model pretrained from scratch on a user's plain-text corpus goes on to SFT with the recipe's own template:
pretraining adds that template's special tokens (chatml's, llama3's), not the embedded world's."""

from __future__ import annotations

import json

import pytest

from alignpipe.cli import main
from alignpipe.runfolder.manifests import read_manifest
from conftest import TINY_MODEL, write_yaml


pytestmark = pytest.mark.slow  # every test here trains a model


@pytest.mark.parametrize("template,end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_pretrain_from_scratch_then_sft_with_the_recipes_template(tmp_path, template, end):
    from transformers import AutoTokenizer

    corpus = "\n\n".join(f"The sum of {a} and {b} is {a + b}.\nWell done." for a in range(20) for b in range(10))
    (tmp_path / "corpus.txt").write_text(corpus + "\n")
    (tmp_path / "chat.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {a}."},
                                 {"role": "assistant", "content": f"It is {2 * a}."}]}) + "\n" for a in range(60)))
    trainer = {"max_steps": 3, "per_device_train_batch_size": 8, "warmup_steps": 0, "logging_steps": 1}
    recipe = {"name": "scratch", "seed": 0, "runs_dir": str(tmp_path / "runs"), "model": TINY_MODEL,
              "chat_template": template, "stages": {
                  "pretrain": {"data": {"path": "corpus.txt"}, "block_size": 32, "trainer": trainer},
                  "sft": {"from": "pretrain", "data": {"path": "chat.jsonl"}, "trainer": {**trainer, "max_length": 64}}}}
    path = write_yaml(tmp_path / "r.yaml", recipe)
    assert main(["run", str(path)]) == 0
    runs = tmp_path / "runs" / "scratch"
    assert read_manifest(runs / "sft")["status"] == "complete"
    tok = AutoTokenizer.from_pretrained(runs / "pretrain" / "model")
    ids = tok(end, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and tok.added_tokens_decoder[ids[0]].special  # one special token, not pieces of text
    report = json.loads((runs / "pretrain" / "data_report.json").read_text())
    assert report["sources"][0]["format"] == "text" and report["split"]["heldout_rows"] >= 1
