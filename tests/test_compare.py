"""Experiments side by side (`alignpipe compare`, `report.compare`): two sibling DPO stages from one SFT, trained for
real, and a re-run of one with `--set` that keeps its first version in history. The config difference names beta,
the head-to-head counts add up to the pairs of the same prompts (counted here from the samples files), the figures
are images, and the run report shows the siblings and names the history version. Fast tests on hand-written
stage folders: prompts that differ, a judge a stage optimised, the reward model as a judge, bad targets."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from matplotlib.image import imread

from alignpipe.cli import main
from alignpipe.errors import RunError
from alignpipe.eval.stats import wilson
from alignpipe.report.compare import build_comparison, render_markdown
from alignpipe.report.document import write_report
from alignpipe.runfolder.files import read_jsonl
from conftest import TINY_EVAL, copy_base, stage_manifest, tiny_recipe, write_yaml

TRAINER = {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 0,
           "logging_steps": 1}
SIBLINGS = {name: {"kind": "dpo", "from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
                   "trainer": {**TRAINER, "beta": beta}} for name, beta in (("dpo_b01", 0.1), ("dpo_b05", 0.5))}


@pytest.fixture(scope="module")
def siblings(tmp_path_factory, tiny_base):
    """The session's tiny pretrain -> sft, then dpo_b01 (beta 0.1) and dpo_b05 (beta 0.5) from sft; then dpo_b01
    re-run with `--set stages.dpo_b01.trainer.beta=0.3`, which keeps its version 1 in `.history/dpo_b01/1`."""
    root = tmp_path_factory.mktemp("compare")
    copy_base(tiny_base, root / "runs")
    recipe = write_yaml(root / "tiny.yaml", tiny_recipe(root / "runs", extra_stages=SIBLINGS))
    assert main(["run", str(recipe)]) == 0
    assert main(["run", str(recipe), "--set", "stages.dpo_b01.trainer.beta=0.3"]) == 0
    run = root / "runs" / "tiny"
    assert stage_manifest(run / "dpo_b01")["version"] == 2
    assert stage_manifest(run / ".history" / "dpo_b01" / "1")["resolved_config"]["trainer"]["beta"] == 0.1
    return run


def pairs_of_same_prompts(a: Path, b: Path) -> tuple[int, int, int, int]:
    """Counted from the two samples files: (prompts both answered, k-th with k-th pairs, pairs where `a` passes the
    judge and `b` fails, the reverse)."""
    rows_a, rows_b = read_jsonl(a / "eval_samples.jsonl"), read_jsonl(b / "eval_samples.jsonl")
    count_a, count_b = Counter(r["prompt"] for r in rows_a), Counter(r["prompt"] for r in rows_b)
    shared = set(count_a) & set(count_b)
    wins = losses = 0
    for p in shared:
        mine, theirs = [r for r in rows_a if r["prompt"] == p], [r for r in rows_b if r["prompt"] == p]
        for x, y in zip(mine, theirs):
            wins += bool(x["judge"]) and not bool(y["judge"])
            losses += bool(y["judge"]) and not bool(x["judge"])
    return len(shared), sum(min(count_a[p], count_b[p]) for p in shared), wins, losses


@pytest.mark.slow
def test_sibling_stages_config_metrics_and_head_to_head(siblings):
    a, b = siblings / "dpo_b01", siblings / "dpo_b05"
    comparison = build_comparison([a, b])
    json.loads(json.dumps(comparison))  # plain data, as the web UI reads it
    assert [e["label"] for e in comparison["entries"]] == ["dpo_b01", "dpo_b05"]
    (group,) = comparison["groups"]

    # only the keys that differ: beta (0.3 after the re-run against 0.5), not the steps or the data both share
    differs = group["config"]["differs"]
    assert differs["trainer.beta"] == {"dpo_b01": 0.3, "dpo_b05": 0.5}
    assert "trainer.max_steps" not in differs and "data.embedded" not in differs and group["config"]["same"] > 20
    for key, values in differs.items():
        assert len({json.dumps(v) for v in values.values()}) == 2, key

    # the judge's pass rate of each, with the Wilson interval of its own counts
    row = next(r for r in group["metrics"] if r["metric"] == "judge_pass_rate")
    for label, folder in (("dpo_b01", a), ("dpo_b05", b)):
        m = stage_manifest(folder)["metrics"]
        cell = row["values"][label]
        assert (cell["lo"], cell["hi"]) == wilson(m["judge_passed"], m["judge_total"]) and cell["n"] == m["judge_total"]

    # head to head by the judge: the counts are those of the k-th with k-th pairs of the same prompts
    (h2h,) = group["head_to_head"]
    prompts, pairs, wins, losses = pairs_of_same_prompts(a, b)
    judge = h2h["by_judge"]["judge"]
    assert (h2h["paired_prompts"], h2h["pairs"]) == (prompts, pairs) and pairs == 2 * TINY_EVAL["num_prompts"]
    assert judge["wins"] + judge["ties"] + judge["losses"] == pairs
    assert (judge["wins"], judge["losses"]) == (wins, losses)
    assert judge["lo"] <= judge["rate"] <= judge["hi"]

    # curves of both stages' training logs, per quantity
    assert set(group["curves"]["metrics"]["loss"]) == {"dpo_b01", "dpo_b05"}
    assert len(group["curves"]["metrics"]["loss"]["dpo_b01"]["y"]) == TRAINER["max_steps"]

    text = render_markdown(comparison)
    assert "| trainer.beta | 0.3 | 0.5 |" in text and f"| dpo_b01 vs dpo_b05 | judge | {wins}/" in text


@pytest.mark.slow
def test_compare_command_writes_markdown_json_and_figures(siblings, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(siblings / "dpo_b01"), str(siblings / "dpo_b05"), "--out", str(out)]) == 0
    assert "trainer.beta" in capsys.readouterr().out
    comparison = json.loads((out / "compare.json").read_text())
    text = (out / "compare.md").read_text()
    curves = comparison["groups"][0]["curves"]["metrics"]
    figures = sorted(out.glob("fig-compare-*.png"))
    assert len(figures) == len(curves) >= 3 and (out / "fig-compare-loss.png") in figures
    for png in figures:
        img = imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0
        assert f"]({png.name})" in text


@pytest.mark.slow
def test_history_version_against_the_current_one(siblings):
    # one stage alone: against the versions its history keeps
    comparison = build_comparison([siblings / "dpo_b01"])
    assert [(e["label"], e["current"]) for e in comparison["entries"]] == [("dpo_b01@v2", True), ("dpo_b01@v1", False)]
    assert comparison["groups"][0]["config"]["differs"]["trainer.beta"] == {"dpo_b01@v2": 0.3, "dpo_b01@v1": 0.1}
    # the same version named three ways: @N, @vN and the history folder's path
    for target in (f"{siblings}/dpo_b01@1", f"{siblings}/dpo_b01@v1", siblings / ".history" / "dpo_b01" / "1"):
        entry = build_comparison([target, siblings / "dpo_b05"])["entries"][0]
        assert (entry["label"], entry["version"], entry["path"]) == (
            "dpo_b01@v1", 1, str((siblings / ".history" / "dpo_b01" / "1").absolute()))
    with pytest.raises(RunError, match=r"no complete version 7 \(versions kept: 2, 1\)"):
        build_comparison([f"{siblings}/dpo_b01@7"])


@pytest.mark.slow
def test_run_folders_alone_and_against_a_copy(siblings, tmp_path):
    # one run folder: its sibling stages (pretrain and sft have no sibling)
    (group,) = build_comparison([siblings])["groups"]
    assert group["members"] == ["dpo_b01", "dpo_b05"]
    # two run folders: the stages of the same name; a copy ties with itself on every pair
    copy = tmp_path / "copy" / "tiny2"
    shutil.copytree(siblings, copy)
    comparison = build_comparison([siblings, copy])
    assert [g["name"] for g in comparison["groups"]] == ["pretrain", "sft", "dpo_b01", "dpo_b05"]
    dpo = comparison["groups"][2]
    assert dpo["members"] == ["tiny/dpo_b01", "tiny2/dpo_b01"] and dpo["config"]["differs"] == {}
    judge = dpo["head_to_head"][0]["by_judge"]["judge"]
    assert judge["ties"] == judge["pairs"] == dpo["head_to_head"][0]["pairs"] > 0


@pytest.mark.slow
def test_report_shows_siblings_and_names_the_history_version(siblings):
    path, _ = write_report(siblings, score_rewards=False)
    text = path.read_text()
    section = text.split("## Sibling stages and earlier versions")[1].split("\n## ")[0]
    assert "### Siblings from sft: dpo_b01, dpo_b05" in section
    assert "| trainer.beta | 0.3 | 0.5 |" in section and "| dpo_b01 vs dpo_b05 | judge |" in section
    assert "| judge_pass_rate |" in section
    assert ("`dpo_b01`: this report shows its current version, 2; 1 earlier version kept in `.history/dpo_b01/` (1). "
            "Version 2 differs from version 1 in: `trainer.beta` 0.1 → 0.3.") in section
    assert "> **Note:** stage `dpo_b01` is version 2 of it; 1 earlier version kept" in text


# --- fast: hand-written stage folders -------------------------------------------------------------


def stage_folder(run: Path, name: str, samples: list[dict], metrics: dict | None = None, **manifest) -> Path:
    """A complete stage folder as a policy stage leaves it: manifest.json and eval_samples.jsonl."""
    folder = run / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "stage": name, "kind": "dpo", "status": "complete", "version": 1, "parent": {"stage": "sft"},
        "resolved_config": {"kind": "dpo", "from": "sft", "trainer": {"beta": 0.1}}, "seed": 0,
        "metrics": {"judge_pass_rate": sum(r["judge"] for r in samples) / len(samples),
                    "judge_passed": sum(r["judge"] for r in samples), "judge_total": len(samples), **(metrics or {})},
        **manifest}))
    (folder / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return folder


def samples(prompts: list[str], passes: list[bool], **extra) -> list[dict]:
    return [{"prompt": p, "response": f"answer {i}", "judge": ok, **{k: v[i] for k, v in extra.items()}}
            for i, (p, ok) in enumerate(zip(prompts, passes))]


def test_prompts_that_differ_are_counted_not_paired(tmp_path):
    a = stage_folder(tmp_path / "runs" / "r", "a", samples(["p1", "p1", "p2", "p2", "p3", "p3"], [1, 1, 0, 1, 1, 0]))
    b = stage_folder(tmp_path / "runs" / "r", "b", samples(["p2", "p2", "p3", "p4"], [0, 0, 1, 1]))
    comparison = build_comparison([a, b])
    h2h = comparison["groups"][0]["head_to_head"][0]
    # p2: (0,0) tie, (1,0) win; p3: (1,1) tie (b has one sample of p3, so one pair)
    assert (h2h["prompts_a"], h2h["prompts_b"], h2h["paired_prompts"], h2h["pairs"]) == (3, 3, 2, 3)
    judge = h2h["by_judge"]["judge"]
    assert (judge["wins"], judge["ties"], judge["losses"]) == (1, 2, 0)
    assert "the prompts differ; 2 paired (3 answered by a, 3 by b)" in render_markdown(comparison)


def test_no_verdict_by_a_judge_a_stage_optimised(tmp_path):
    run = tmp_path / "runs" / "r"
    a = stage_folder(run, "a", samples([f"p{i}" for i in range(20)], [True] * 20),
                     {"optimised_judges": {"judge": "it trained on the judge as its reward"}, "eot_rate": 1.0})
    b = stage_folder(run, "b", samples([f"p{i}" for i in range(20)], [False] * 20))
    judge = build_comparison([a, b])["groups"][0]["head_to_head"][0]["by_judge"]["judge"]
    assert judge["wins"] == 20 and judge["lo"] > 0.5
    assert judge["verdict"] == "not independent: a optimised it"
    run2 = tmp_path / "runs" / "r2"
    c = stage_folder(run2, "a", samples([f"p{i}" for i in range(20)], [True] * 20), {"eot_rate": 1.0})
    d = stage_folder(run2, "b", samples([f"p{i}" for i in range(20)], [False] * 20))
    assert build_comparison([c, d])["groups"][0]["head_to_head"][0]["by_judge"]["judge"]["verdict"] == "a better"


def test_reward_model_judges_only_when_both_were_scored_by_the_same_one(tmp_path):
    run = tmp_path / "runs" / "r"
    prompts = ["p1", "p2", "p3", "p4"]
    scored = {"reward_stage": "reward"}
    a = stage_folder(run, "a", samples(prompts, [0] * 4, reward=[1.0, 2.0, 3.0, 0.0]), scored,
                     inputs={"upstream:reward": "0" * 64})
    b = stage_folder(run, "b", samples(prompts, [0] * 4, reward=[0.5, 2.5, 1.0, 0.0]), scored,
                     inputs={"upstream:reward": "0" * 64})
    reward = build_comparison([a, b])["groups"][0]["head_to_head"][0]["by_judge"]["reward"]
    assert (reward["wins"], reward["ties"], reward["losses"]) == (2, 1, 1)
    c = stage_folder(run, "c", samples(prompts, [0] * 4, reward=[0.5, 2.5, 1.0, 0.0]), scored,
                     inputs={"upstream:reward": "1" * 64})
    h2h = build_comparison([a, c])["groups"][0]["head_to_head"][0]
    assert "reward" not in h2h["by_judge"] and "changed between them" in " ".join(h2h["left_out"])


def test_bad_targets_are_one_line(tmp_path):
    run = tmp_path / "runs" / "r"
    a = stage_folder(run, "a", samples(["p1"], [True]))
    with pytest.raises(RunError, match="no such stage or run folder"):
        build_comparison([tmp_path / "nope", a])
    with pytest.raises(RunError, match="either stages or run folders"):
        build_comparison([run, a])
    with pytest.raises(RunError, match="no earlier version to compare with"):
        build_comparison([a])
    with pytest.raises(RunError, match="no sibling stages"):
        build_comparison([run])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="neither a stage folder"):
        build_comparison([tmp_path / "empty", a])
    assert main(["compare", str(tmp_path / "nope"), str(a)]) == 2
