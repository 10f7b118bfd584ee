"""lm-evaluation-harness on a stage's checkpoint (LoRA merged onto its base), offline: the shipped
GSM8K-style task pointed at a local file from a stage's `eval.lm_eval` block, and a user's own task
(a YAML over a local file) through `alignpipe eval runs/x/<stage> --tasks`. Results land in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.runfolder.manifests import read_manifest
from conftest import write_yaml
from hub_layout import save_tiny_model
from test_eval_user_data import TRAINER, write_files

pytestmark = pytest.mark.slow  # every test here trains a model


pytest.importorskip("lm_eval", reason="the lmeval extra (CI installs it)")

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lm_eval_in_a_stage_and_on_demand(tmp_path):
    model_dir = save_tiny_model(tmp_path / "hub" / "tiny-qwen2")
    files = write_files(tmp_path)
    gsm = tmp_path / "gsm8k_copy.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {a} plus {a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"})
                           + "\n" for a in range(4)))
    path = write_yaml(tmp_path / "lmeval.yaml", {
        "name": "lmeval", "seed": 0, "runs_dir": str(tmp_path / "runs"), "model": {"path": str(model_dir)},
        "chat_template": "chatml", "stages": {
            "sft": {"data": {"path": str(files["chat"])}, "lora": {"r": 4, "alpha": 8},
                    "trainer": {**TRAINER, "max_steps": 2},
                    "eval": {"prompts": str(files["prompts"]), "num_prompts": 2, "samples_per_prompt": 1,
                             "max_new_tokens": 4,
                             "lm_eval": {"tasks": ["gsm8k_local"], "data_files": {"gsm8k_local": str(gsm)},
                                         "limit": 2, "batch_size": 2, "max_gen_toks": 16}}}}})
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path)]) == 0
    sft = tmp_path / "runs" / "lmeval" / "sft"
    m = read_manifest(sft)["metrics"]
    assert set(m["lm_eval"]["gsm8k_local"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert 0 <= m["lmeval_gsm8k_local_exact_match_strict_match"] <= 1

    # a task of the user's own, over a local file, run on demand; the results join the manifest
    rows = tmp_path / "mc.jsonl"
    rows.write_text("".join(json.dumps({"question": f"What is {a} plus 1?", "choices": [str(a + 1), str(a + 5)],
                                        "label": 0}) + "\n" for a in range(6)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(MC_TASK.format(file=rows))
    assert main(["eval", str(sft), "--tasks", "tiny_mc", "--include-path", str(tasks)]) == 0
    after = read_manifest(sft)["metrics"]
    assert 0 <= after["lm_eval"]["tiny_mc"]["acc,none"] <= 1 and "lmeval_tiny_mc_acc_none" in after
    assert after["lmeval_gsm8k_local_exact_match_strict_match"] == m["lmeval_gsm8k_local_exact_match_strict_match"]
    assert main(["report", str(tmp_path / "runs" / "lmeval")]) == 0
    text = (tmp_path / "runs" / "lmeval" / "report.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in text and "| sft | tiny_mc | acc,none |" in text
