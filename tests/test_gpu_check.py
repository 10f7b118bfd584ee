"""The GPU check (benchmarks/gpu_check.py) on its CPU dry run: the same code path as on a GPU (data, hub-layout
model, alignpipe's five LoRA stages through `alignpipe run`, the plain TRL baseline, the figures and ratios) at
tiny shapes, in bfloat16 as on the GPU (the weights, peft's fp32 adapters, the bf16 tolerances of padding-free's
check and of the reward model's reload check). Speeds here say nothing; what is checked is that every stage runs,
that both sides did the same work (the same real tokens per step), and that the result file holds what the GPU run
must report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import gpu_check, gpu_work
from conftest import REPO

CPU = gpu_work.CPU


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--dtype", "bfloat16", "--out", str(out),
           "--workdir", str(tmp / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_every_stage_runs_on_both_sides(dry_run):
    result, stdout = dry_run
    ours, theirs = result["alignpipe"]["stages"], result["trl"]["stages"]
    assert list(ours) == list(gpu_check.ALIGNPIPE_STAGES) and list(theirs) == list(gpu_check.COMPARED)
    assert {s: r["status"] for s, r in {**ours, **{f"trl {k}": v for k, v in theirs.items()}}.items()} == \
        {s: "ok" for s in [*ours, *(f"trl {k}" for k in theirs)]}
    for stage in ("sft", "reward", "dpo", "grpo"):  # each trainer stage ran exactly its configured steps
        assert ours[stage]["steps"] == CPU.steps[stage] and ours[stage]["manifest"]["status"] == "complete"
    assert ours["ppo"]["ppo"]["steps"] == CPU.ppo["total_updates"]
    for stage in ("sft", "dpo", "grpo", "ppo"):  # every policy stage evaluated on the held-out prompts
        assert ours[stage]["manifest"]["eval_status"] == "complete"
        assert ours[stage]["manifest"]["eval_samples"] == CPU.eval["num_prompts"] * CPU.eval["samples_per_prompt"]
    for stage in ("sft", "dpo"):
        assert theirs[stage]["steps"] == CPU.steps[stage]
    assert ours["grpo"]["grpo"]["trl_num_tokens"] > 0  # GRPO's tokens are made inside its steps: TRL's count
    for name in (*gpu_check.ALIGNPIPE_STAGES, "trl sft", "trl dpo"):
        assert f"\n{name} " in stdout


@pytest.mark.slow
def test_both_sides_do_the_same_work_and_the_ratios_follow(dry_run):
    result, _ = dry_run
    ours, theirs = result["alignpipe"]["stages"], result["trl"]["stages"]
    for stage in gpu_check.COMPARED:
        a, t = ours[stage], theirs[stage]
        # same data, template, batch and max_length: about the same real tokens per step (the rows differ only
        # by alignpipe's held-out split), and the same start: first losses of one model on such rows
        assert result["ratios"][stage]["real_tokens_per_step"] == pytest.approx(1.0, abs=0.15)
        assert 0 < a["real_tokens"] <= a["tokens"] and 0 < t["real_tokens"] <= t["tokens"]
        assert result["ratios"][stage]["real_tokens_per_s"] == pytest.approx(
            a["real_tokens_per_s"] / t["real_tokens_per_s"], rel=1e-2)
        assert a["time_to_first_step_s"] > 0 and t["time_to_first_step_s"] > 0
        assert a["steady_steps"] == CPU.steps[stage] - CPU.skip_steps
    assert result["mode"] == "cpu dry run" and result["machine"]["device"] == "cpu"
    assert result["dtype"] == "bfloat16"
    assert result["versions"]["trl"] and result["versions"]["torch"]
    assert result["settings"]["shape"] == "tiny"


def test_the_real_shape_is_qwen2_5_0_5b():
    """The GPU run's model has Qwen2.5-0.5B's published size: 494,032,768 parameters (embedding tied)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignpipe.models.tiny import SHAPES

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[gpu_work.GPU.shape]))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768


def test_generated_rows_mostly_fit_max_length(tmp_path):
    """The check's data: pairs whose prompt and longer answer fit max_length with the check's tokenizer, nearly
    all (the reward stage drops a pair that does not), and lengths spread (so batches carry padding)."""
    from alignpipe.models.tiny import build_tokenizer

    settings = gpu_work.GPU
    files = gpu_work.write_data(tmp_path, settings)
    tok = build_tokenizer("qwen2", gpu_work.tokenizer_texts(), settings.tokenizer_vocab)
    pairs = [json.loads(line) for line in open(files["pairs"])][:200]
    lengths = [len(tok(p["prompt"] + " " + max(p["chosen"], p["rejected"], key=len))["input_ids"]) + 12
               for p in pairs]  # + the chat template's frame
    assert sum(n <= settings.max_length for n in lengths) >= 0.9 * len(lengths)
    assert min(lengths) < settings.max_length / 4
