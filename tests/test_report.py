"""The run report (figures that open, every policy stage in the pass-rate chart, samples, win rates) and
recipe gates (safe parsing, validation, a missed gate fails the run but keeps the stage)."""

from __future__ import annotations

import json
import shutil

import pytest
from matplotlib.image import imread

from alignpipe.cli import main
from alignpipe.errors import RecipeError
from alignpipe.pipeline.gates import GateSyntaxError, evaluate_gates, parse_gate
from alignpipe.pipeline.validate import validate
from alignpipe.recipe.parse import load_recipe
from alignpipe.report.document import paired, task_kind, wilson, win_rate, write_report
from conftest import TINY_EVAL, copy_base, stage_manifest, tiny_recipe, write_yaml


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_base):
    """A copy of the session's tiny pretrain+sft run, shared by the tests of this file (copy it before changing it)."""
    return copy_base(tiny_base, tmp_path_factory.mktemp("report") / "runs")


@pytest.mark.slow
def test_report_after_pretrain_and_sft(tiny_run, capsys):
    assert main(["report", str(tiny_run)]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (tiny_run / "report.md").read_text()

    # at least 5 figures, each a real image, each linked from the report
    pngs = sorted(tiny_run.glob("*.png"))
    assert len(pngs) >= 5, pngs
    for png in pngs:
        img = imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
        assert f"]({png.name})" in text
    assert (tiny_run / "fig-pass_rate.png") in pngs and (tiny_run / "fig-curves_sft.png") in pngs

    # the pass rate of every policy stage, with its Wilson interval, from its own samples
    for stage in ("pretrain", "sft"):
        m = stage_manifest(tiny_run / stage)["metrics"]
        lo, hi = wilson(m["judge_passed"], m["judge_total"])
        assert f"{m['judge_pass_rate']:.1%} [{lo:.1%}, {hi:.1%}]" in text

    # lineage, and the sample table: the same held-out prompts answered by both stages
    assert "pretrain → sft" in text
    table = text.split("## Sample responses")[1]
    assert "| prompt | pretrain | sft |" in table
    first_prompt = json.loads((tiny_run / "sft" / "eval_samples.jsonl").read_text().splitlines()[0])["prompt"]
    assert first_prompt in table
    assert "## Aligned policies vs SFT" not in text  # nothing aligned yet: no empty section

    # a second report replaces the first's figures, no duplicates
    write_report(tiny_run)
    assert sorted(tiny_run.glob("*.png")) == pngs


ALIGNED = {  # tiny reward, dpo and ppo stages on top of tiny_run's sft: seconds each
    "reward": {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
               "trainer": {"max_steps": 24, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                           "warmup_steps": 0, "logging_steps": 2}},
    "dpo": {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
            "trainer": {"max_steps": 10, "per_device_train_batch_size": 8, "logging_steps": 2, "warmup_steps": 0}},
    "ppo": {"from": "sft", "reward_model": "reward", "data": {"embedded": "rl_prompts"}, "eval": TINY_EVAL,
            "trainer": {"total_updates": 4, "rollout_batch_size": 16, "minibatch_size": 8, "max_new_tokens": 12}},
}


@pytest.mark.slow
def test_report_covers_reward_dpo_and_ppo(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    recipe = write_yaml(tmp_path / "aligned.yaml", tiny_recipe(runs, extra_stages=ALIGNED))
    assert main(["run", str(recipe)]) == 0
    run = runs / "tiny"
    path, figures = write_report(run)
    text = path.read_text()
    names = {p.name for p in figures}

    # every stage's training curves; the reward model's figures; win rates of both aligned policies
    assert {f"fig-curves_{s}.png" for s in ("pretrain", "sft", "reward", "dpo", "ppo")} <= names
    assert {"fig-reward_accuracy.png", "fig-reward_calibration.png", "fig-reward_reward_vs_length.png",
            "fig-win_rates.png", "fig-pass_rate.png"} <= names
    for p in figures:
        assert imread(p).ndim == 3
    wins = text.split("## Aligned policies vs SFT")[1].split("##")[0]
    assert "| dpo | sft |" in wins and "| ppo | sft |" in wins and "| reward |" in wins  # judged by RM too
    assert "| prompt | pretrain | sft | dpo | ppo |" in text  # the sample table has every policy stage
    pass_rates = text.split("## Judge pass rate")[1].split("##")[0]
    assert "`dpo`:" in pass_rates and "`ppo`:" in pass_rates

    # the judge win rate is recomputed from the samples: check one by hand
    sft, dpo = (_jsonl(run / s / "eval_samples.jsonl") for s in ("sft", "dpo"))
    outcome = [1.0 if a["judge"] > b["judge"] else 0.0 if a["judge"] < b["judge"] else 0.5
               for a, b in (p for rows in paired(dpo, sft).values() for p in rows)]
    assert f"| dpo | sft | {sum(outcome) / len(outcome):.1%} [" in wins

    # issue #34, as in the default recipe: no verdict for ppo on the reward model it optimised, nor for dpo on a
    # reward model trained on its own pairs; both beside their parent sampled greedily, by every judge
    helped = text.split("## Did it help?")[1].split("Response health")[0]
    for stage in ("dpo", "ppo"):
        [rm_row] = [r for r in helped.splitlines() if r.startswith(f"| **{stage}**") and "reward model" in r]
        assert rm_row.count("optimised on this judge; not independent evidence") == 2 and "better" not in rm_row
        m = stage_manifest(run / stage)["metrics"]
        assert set(m["optimised_judges"]) == {"rm"}
        for key in ("judge_win_rate_vs_greedy_parent", "rm_win_rate_vs_greedy_parent"):
            lo, hi = m[f"{key}_ci"]
            assert 0 <= lo <= m[key] <= hi <= 1
    assert "| vs parent greedy [95% CI] | verdict (greedy parent) |" in helped
    assert "RM: better" not in wins  # the table against sft says the same


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_missed_gate_fails_the_run_and_keeps_the_stage(tiny_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    gated = tiny_recipe(runs)
    gated["stages"]["sft"]["gates"] = ["eval_loss <= pretrain.eval_loss * 10",  # passes
                                       "judge_pass_rate >= 1.5"]  # impossible
    recipe = write_yaml(tmp_path / "gated.yaml", gated)
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("alignpipe: error")][0]
    assert "gate missed" in line and "'sft'" in line and "judge_pass_rate" in line and "1.5" in line
    assert "stages.sft.gates[1]" in line

    sft = stage_manifest(runs / "tiny" / "sft")
    assert sft["status"] == "complete" and (runs / "tiny" / "sft" / "model" / "model.safetensors").is_file()
    passed, missed = json.loads((runs / "tiny" / "sft" / "gates.json").read_text())
    assert passed["passed"] is True and passed["threshold"] == pytest.approx(
        stage_manifest(runs / "tiny" / "pretrain")["metrics"]["eval_loss"] * 10)
    assert missed == {"expr": "judge_pass_rate >= 1.5", "metric": "judge_pass_rate", "op": ">=",
                      "value": sft["metrics"]["judge_pass_rate"], "threshold": 1.5, "passed": False}

    # run again: the stage is skipped, and the run still fails on the recorded gate
    assert main(["run", str(recipe)]) == 2
    assert "skipped" in capsys.readouterr().err

    # the report marks it
    write_report(runs / "tiny")
    text = (runs / "tiny" / "report.md").read_text()
    assert "**MISSED**" in text and "missed its gate `judge_pass_rate >= 1.5`" in text


def test_gate_validation_names_the_gate(tmp_path, capsys):
    def recipe_with(gates, stage="sft"):
        data = tiny_recipe(tmp_path / "runs")
        data["stages"][stage]["gates"] = gates
        return load_recipe(write_yaml(tmp_path / "r.yaml", data))

    validate(recipe_with(["judge_pass_rate >= pretrain.judge_pass_rate + 0.1", "eval_loss < 3"]))
    for gates, stage, needle in ((["judge_pass_rate >= 1 +"], "sft", "ends too early"),
                                 (["ok > 1", "judge_pass_rate >= dpo.judge_pass_rate"], "sft", "stage 'dpo'"),
                                 (["x >= 1", "y >= 2", "eval_loss <= sft.eval_loss"], "pretrain", "runs after"),
                                 (["import os"], "sft", "expected '<metric> <op> <expression>'")):
        with pytest.raises(RecipeError, match=needle) as err:
            validate(recipe_with(gates, stage))
        assert err.value.key == f"stages.{stage}.gates[{len(gates) - 1}]"

    recipe_with(["judge_pass_rate >= 0.5 0.1"])
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "stages.sft.gates[0]" in capsys.readouterr().err


def test_gate_parser_is_arithmetic_only():
    gate = parse_gate("kl_to_reference <= (sft.x + 2) * 3 - -1 / 4")
    assert gate.refs() == [(None, "kl_to_reference"), ("sft", "x")]
    for bad in ("x >= __import__('os').system('true')", "x >= y if z", "x >= [1]", "x = 1", "1 >= x", "x >= 1,"):
        with pytest.raises(GateSyntaxError):
            parse_gate(bad)


def test_gate_evaluation_reads_other_stages(tmp_path):
    data = tiny_recipe(tmp_path / "runs")
    data["stages"]["sft"]["gates"] = ["judge_pass_rate >= pretrain.judge_pass_rate + 0.1", "missing_metric > 0"]
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", data))
    pre = recipe.stage_dir("pretrain")
    pre.mkdir(parents=True)
    (pre / "manifest.json").write_text(json.dumps({"status": "complete", "metrics": {"judge_pass_rate": 0.25}}))
    ok, missing = evaluate_gates(recipe, "sft", {"judge_pass_rate": 0.3})
    assert ok["threshold"] == pytest.approx(0.35) and ok["passed"] is False
    assert missing["passed"] is False and missing["value"] is None and "not reported" in missing["reason"]
    ok, _ = evaluate_gates(recipe, "sft", {"judge_pass_rate": 0.36})
    assert ok["passed"] is True


# --- aligned stages and the reward model, from a run folder written by hand ---------------------


def _stage(root, name, kind, metrics, samples=None, parent=None, lineage=(), **extra):
    d = root / name
    d.mkdir(parents=True)
    manifest = {"stage": name, "kind": kind, "status": "complete", "schema": 1, "metrics": metrics,
                "parent": {"stage": parent} if parent else None, "lineage": list(lineage), "wall_time_s": 1.0,
                "started_at": f"2026-01-01T00:00:0{len(lineage)}", **extra}
    (d / "manifest.json").write_text(json.dumps(manifest))
    if samples is not None:
        (d / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return d


def _samples(judge, reward):
    prompts = ["add 1 and 2.", "what is 3 minus 1?", "reverse the word cat.", "count the letters in dog."]
    return [{"prompt": prompts[i // 2], "response": f"r{i}", "judge": j, "ended": True, "tokens": 3 + i, "reward": r}
            for i, (j, r) in enumerate(zip(judge, reward))]


def test_win_rates_by_judge_and_reward_model(tmp_path):
    run = tmp_path / "run"
    sft_judge = [True, False, False, False, False, False, False, False]
    dpo_judge = [True, True, True, False, False, False, False, False]
    sft = _samples(sft_judge, [0.0] * 8)
    dpo = _samples(dpo_judge, [1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0])
    judged = {"judge_pass_rate": 0.1, "judge_passed": 1, "judge_total": 8, "reward_stage": "rm"}
    _stage(run, "sft", "sft", judged, sft, lineage=["pretrain"])
    _stage(run, "dpo", "dpo", {**judged, "judge_pass_rate": 0.375, "judge_passed": 3}, dpo, parent="sft",
           lineage=["pretrain", "sft"])
    calibration = [{"bucket": [0.5, 0.55], "count": 10, "confidence": 0.52, "accuracy": 0.5},
                   {"bucket": [0.9, 0.95], "count": 30, "confidence": 0.93, "accuracy": 0.9}]
    rm = _stage(run, "rm", "reward", {"pairwise_accuracy": 0.9, "eval_pairs": 40, "onpolicy_accuracy": 0.7,
                                      "onpolicy_pairs": 20, "ece": 0.02}, sft, parent="sft",
                lineage=["pretrain", "sft"])
    (rm / "reward_eval.json").write_text(json.dumps({"calibration": calibration}))

    # by hand: judge W/T/L = 2/6/0 -> 0.625; reward model W/L = 6/2 -> 0.75; of the 2 pairs the judge
    # decides, the reward model orders 1 the same way (the other: dpo's 3rd sample, judged pass, reward -1)
    judge = win_rate(paired(dpo, sft), "judge")
    rm_rate = win_rate(paired(dpo, sft), "reward")
    assert (judge["wins"], judge["ties"], judge["losses"], judge["rate"]) == (2, 6, 0, 0.625)
    assert rm_rate["rate"] == 0.75 and rm_rate["lo"] <= 0.75 <= rm_rate["hi"]

    path, figures = write_report(run)
    text = path.read_text()
    assert "| dpo | sft | 62.5% [" in text and "| 2/6/0 | 75.0% [" in text and "| rm | 1/2 |" in text
    assert "Where they disagree" in text and "what is 3 minus 1?" in text.split("Where they disagree")[1]
    names = {p.name for p in figures}
    assert {"fig-win_rates.png", "fig-rm_accuracy.png", "fig-rm_calibration.png", "fig-rm_reward_vs_length.png",
            "fig-pass_rate.png"} <= names
    for p in figures:
        assert imread(p).ndim == 3


def test_judge_trained_stage_is_flagged(tmp_path):
    run = tmp_path / "run"
    samples = _samples([True] * 8, [0.0] * 8)
    _stage(run, "sft", "sft", {"judge_pass_rate": 1.0, "judge_passed": 8, "judge_total": 8}, samples)
    _stage(run, "grpo", "grpo", {"judge_pass_rate": 1.0, "judge_passed": 8, "judge_total": 8,
                                 "judge_used_for_training": True}, samples, parent="sft", lineage=["sft"])
    text = write_report(run, score_rewards=False)[0].read_text()
    assert "stage `grpo` trained on the judge" in text and "stage `sft` trained" not in text


def test_task_kind_of_world_prompts():
    assert task_kind("what is the larger of 4 and 83?") == "compare"
    assert task_kind("Reverse the word  cat.") == "reverse"
    assert task_kind("tell me a joke") is None


@pytest.mark.slow
def test_missed_gate_in_the_middle_stops_the_stages_after_it(tiny_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    after = {"from": "sft", "data": {"embedded": "pairs"}, "eval": {"enabled": False},
             "trainer": {"max_steps": 2, "per_device_train_batch_size": 8}}
    gated = tiny_recipe(runs, extra_stages={"reward": after, "dpo": dict(after)})
    gated["stages"]["sft"]["gates"] = ["judge_pass_rate >= 1.5"]  # impossible
    recipe = write_yaml(tmp_path / "gated.yaml", gated)
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "stage sft missed a gate: not running reward, dpo" in err
    assert err.strip().splitlines()[-1].startswith("alignpipe: error: ") and "gate missed" in err.splitlines()[-1]
    assert stage_manifest(runs / "tiny" / "sft")["status"] == "complete"
    assert not (runs / "tiny" / "reward").exists() and not (runs / "tiny" / "dpo").exists()
    # the stages before it ran as usual (pretrain: skipped, complete)
    assert "stage pretrain: complete with the same config and inputs, skipped" in err
