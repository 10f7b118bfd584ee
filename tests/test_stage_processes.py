"""Independent stages at the same time (`alignpipe run --parallel N`): each in a process of its own, under
the parent's run lock, with the figures of a sequential run; the lock lets in only the parent's children."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from alignpipe.cli import main
from alignpipe.errors import RunError
from alignpipe.pipeline.processes import ready_group, resolve_parallel
from alignpipe.recipe.parse import load_recipe
from alignpipe.runfolder.lock import LOCK_PARENT_ENV, RunLock
from alignpipe.runfolder.manifests import read_manifest
from alignpipe.runtime import threads as thread_choice
from alignpipe.runtime.threads import plan_lanes, stages_at_once, usable_cores
from conftest import TINY_EVAL, copy_base, stage_manifest, tiny_recipe, write_yaml

SIBLING = {"kind": "sft", "from": "pretrain", "data": {"embedded": "sft"}, "eval": TINY_EVAL,
           "trainer": {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 0,
                       "logging_steps": 2}}


@pytest.mark.slow
def test_siblings_run_together_with_the_figures_of_a_sequential_run(tmp_path, capfd, monkeypatch):
    recipe = write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs", extra_stages={"sft2": SIBLING}))
    monkeypatch.setenv(thread_choice.ENV, "auto")  # as `make pipeline`: the siblings share the cores in the plan
    assert main(["run", str(recipe), "--parallel", "2"]) == 0
    out, err = capfd.readouterr()
    assert "stages sft, sft2: running at the same time, one process each" in err, err
    assert out.count("judge_pass_rate") == 1  # one summary table, the parent's (not one per stage process)
    together = tmp_path / "runs" / "tiny"
    in_turn = tmp_path / "seq" / "tiny"
    shutil.copytree(together / "pretrain", in_turn / "pretrain")  # the same parent, skipped: only sft, sft2 train
    assert main(["run", str(recipe), "--set", f"runs_dir={tmp_path / 'seq'}"]) == 0
    err = capfd.readouterr().err
    assert "at the same time" not in err and "stage pretrain: complete with the same config" in err
    for stage in ("sft", "sft2"):
        a, b = stage_manifest(together / stage), stage_manifest(in_turn / stage)
        assert a["status"] == "complete" and a["parent"]["stage"] == "pretrain"
        assert a["parent"]["manifest_sha256"]  # lineage to the pretrain stage the parent process built
        # the plan's share, in turn as side by side: 1 thread each on 2 cores
        assert a["metrics"]["torch_threads"] == b["metrics"]["torch_threads"] == max(1, min(2, usable_cores() // 2))
        assert "shared by 2 stage(s)" in a["metrics"]["torch_threads_why"], stage
        for key in ("train_loss", "eval_loss", "judge_pass_rate"):
            assert a["metrics"][key] == b["metrics"][key], (stage, key)
    assert not (together / ".alignpipe.lock").exists()  # released at the end
    # a second parallel run finds everything complete and skips it
    assert main(["run", str(recipe), "--parallel", "2"]) == 0
    assert "starting over" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_sibling_that_misses_its_gate_fails_the_run_naming_it(tmp_path, capsys):
    gated = {**SIBLING, "gates": ["eval_loss < 0"]}  # can never pass
    recipe = write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs", extra_stages={"sft2": gated}))
    assert main(["run", str(recipe), "--parallel", "2"]) == 2
    err = capsys.readouterr().err
    assert "stage(s) sft2 (exit 2) failed in their own process" in err, err
    runs = tmp_path / "runs" / "tiny"
    assert stage_manifest(runs / "sft")["status"] == "complete"  # the sibling that passed is kept
    assert stage_manifest(runs / "sft2")["status"] == "complete"  # a missed gate keeps the stage (as in turn)


def _try_lock(run_root, parent_pid: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != LOCK_PARENT_ENV}
    if parent_pid is not None:
        env[LOCK_PARENT_ENV] = parent_pid
    code = "import sys; from alignpipe.runfolder.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('in')"
    return subprocess.run([sys.executable, "-c", code, str(run_root)], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_the_lock_lets_in_only_the_children_of_its_holder(tmp_path):
    with RunLock(tmp_path):
        assert _try_lock(tmp_path, str(os.getpid())).stdout.strip() == "in"  # our child, told we hold it
        refused = _try_lock(tmp_path, None)  # anyone else
        assert refused.returncode != 0 and "another alignpipe run is writing" in refused.stderr
        pretending = _try_lock(tmp_path, str(os.getppid()))  # names a pid that is not its parent
        assert pretending.returncode != 0 and "another alignpipe run is writing" in pretending.stderr


def test_parallel_auto_is_cores_over_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cores = len(os.sched_getaffinity(0))
    assert resolve_parallel("auto")[0] == cores
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores))
    assert resolve_parallel("auto")[0] == 1
    assert resolve_parallel("3")[0] == 3
    for bad in ("0", "two"):
        with pytest.raises(RunError, match="--parallel"):
            resolve_parallel(bad)


def test_a_stage_evaluated_with_a_reward_model_trains_beside_it():
    recipe = load_recipe("recipes/default.yaml")
    assert recipe.upstream("dpo") == ["sft", "reward"] and recipe.start_after("dpo") == ["sft"]
    assert recipe.evaluated_with("dpo") == ["reward"]
    assert recipe.start_after("ppo") == ["sft", "reward"] and recipe.evaluated_with("ppo") == []  # trains on it
    order = recipe.order(None)

    def groups(renewed=frozenset()):
        pending, done, out = list(order), set(), []
        while pending:
            lanes = ready_group(recipe, pending, done, 2, set(renewed))
            out.append(lanes)
            done |= {s for lane in lanes for s in lane}
            pending = [s for s in pending if s not in done]
        return out

    # reward, then the ppo trained against it, in one process; dpo in another beside them
    assert groups() == [[["pretrain"]], [["sft"]], [["reward", "ppo"], ["dpo"]]]
    # one process takes one --force for all its stages: --stages dpo,ppo --force leaves reward in a lane of its own
    assert groups({"dpo", "ppo"}) == [[["pretrain"]], [["sft"]], [["reward"], ["dpo"]], [["ppo"]]]
    assert {s: stages_at_once(order, recipe.start_after, recipe.evaluated_with, s, 1) for s in order} == \
        dict.fromkeys(order, 1)  # one core: one stage at a time


def test_a_stage_scored_along_training_starts_after_its_reward_model():
    recipe = load_recipe("recipes/default.yaml", overrides=["stages.dpo.eval.every=10"])
    assert recipe.evaluated_with("dpo") == [] and recipe.start_after("dpo") == ["sft", "reward"]


def test_lanes_leave_out_a_stage_whose_evaluation_stage_is_not_planned():
    after = {"a": [], "b": ["a"], "c": [], "d": []}.get
    scored = {"a": [], "b": [], "c": ["x"], "d": ["c"]}.get  # x is built by no lane; d waits for c
    assert plan_lanes(["a", "b", "c", "d"], set(), after, scored, 3) == [["a", "b"]]
    assert plan_lanes(["a", "b", "c", "d"], {"x"}, after, scored, 3) == [["a", "b"], ["c"], ["d"]]
    assert plan_lanes(["a", "b", "c", "d"], {"x"}, after, scored, 2) == [["a", "b"], ["c"]]  # d: its own lane


DPO_BESIDE = {"reward": {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
                         "trainer": {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                                     "warmup_steps": 0}},
              "dpo": {"from": "sft", "reward_model": "reward", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
                      "trainer": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                                  "warmup_steps": 0}}}


@pytest.mark.slow
def test_dpo_trains_beside_its_reward_model_with_the_figures_of_a_run_in_turn(tmp_path, tiny_base, capfd):
    copy_base(tiny_base, tmp_path / "runs")
    recipe = write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs", extra_stages=DPO_BESIDE))
    assert main(["run", str(recipe), "--parallel", "2"]) == 0
    assert "stages reward, dpo: running at the same time, one process each" in capfd.readouterr().err
    copy_base(tiny_base, tmp_path / "seq")
    assert main(["run", str(recipe), "--set", f"runs_dir={tmp_path / 'seq'}"]) == 0
    assert "at the same time" not in capfd.readouterr().err
    beside, in_turn = (stage_manifest(root / "tiny" / "dpo") for root in (tmp_path / "runs", tmp_path / "seq"))
    assert beside["metrics"]["reward_stage"] == "reward"  # scored with the reward model built beside it
    assert beside["fingerprint"] == in_turn["fingerprint"]
    timing = ("runtime", "per_s", "per_second", "time", "wall")  # wall-clock figures: the only ones that may differ
    figures = [k for k in beside["metrics"] if not any(t in k for t in timing)]
    assert {"judge_pass_rate", "mean_reward", "rm_win_rate_vs_sft", "kl_to_reference"} <= set(figures)
    assert {k: beside["metrics"][k] for k in figures} == {k: in_turn["metrics"].get(k) for k in figures}
    assert main(["run", str(recipe), "--parallel", "2"]) == 0  # a second run skips both
    assert "starting over" not in capfd.readouterr().err


@pytest.mark.slow
def test_dpo_is_not_evaluated_with_a_reward_model_that_missed_its_gate(tmp_path, tiny_base, capfd):
    copy_base(tiny_base, tmp_path / "runs")
    gated = {**DPO_BESIDE, "reward": {**DPO_BESIDE["reward"], "gates": ["pairwise_accuracy > 2"]}}  # never passes
    recipe = write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs", extra_stages=gated))
    assert main(["run", str(recipe), "--parallel", "2"]) == 2
    err = capfd.readouterr().err
    # dpo is stopped whether it is still training (by the run) or already waiting to evaluate (by itself)
    assert "gate MISSED: stage 'reward'" in err and "not evaluated with it" in err or "stage(s) dpo: stopped" in err, err
    assert stage_manifest(tmp_path / "runs" / "tiny" / "reward")["status"] == "complete"
    dpo = read_manifest(tmp_path / "runs" / "tiny" / "dpo")
    assert dpo is None or dpo["status"] != "complete"  # as in turn: not built on a reward model that missed its gate
