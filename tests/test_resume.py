"""A run killed with SIGKILL resumes from its newest complete checkpoint and ends exactly where an
uninterrupted run ends; one writer per run folder; half-written checkpoints are never used.

Each stage kind is run three ways from the same parents: uninterrupted (in this process), in a
subprocess that SIGKILLs itself after a checkpoint, and re-run (in this process) after the kill.
The kill comes from inside the dying process at a fixed step (a TrainerCallback for the
transformers/TRL trainers, the reward function for PPO), so where it dies does not depend on timing.

Training is deterministic, so a re-run that ignored the checkpoint and started over would also end
bit-exact: the resumed process therefore counts what it executes (optimiser steps and logged rows
through a TrainerCallback; PPO updates through the reward function, called once per rollout) and
must run exactly the steps after the checkpoint. The comparison with the uninterrupted run is
bit-exact: every file of the saved model, every metric but wall-clock timings, and every logged
training row, TRL's running `num_tokens` included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from alignpipe.cli import main
from alignpipe.errors import RunError
from alignpipe.recipe.kinds import all_kinds
from alignpipe.runfolder.lock import LOCK_NAME, RunLock
from alignpipe.stages.training import is_complete_checkpoint, last_checkpoint
import alignpipe
from conftest import TINY_EVAL, tiny_recipe, write_yaml
from kill_harness import KILLER

STAGE_MODULES = all_kinds()  # the registry, the built-in kinds loaded


# A PPO reward (TRL reward-function form) that SIGKILLs its process on call $KILL_AT_CALL (one call per update).
# Each call is also recorded, so a test can count the rollouts a process scored.
REWARD = r"""
import os, signal

CALLS = {"n": 0, "batches": []}


def short(prompts, completions, **kwargs):
    CALLS["n"] += 1
    CALLS["batches"].append(len(prompts))
    if CALLS["n"] == int(os.environ.get("KILL_AT_CALL", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return [1.0 - min(len(c[0]["content"]), 40) / 40 for c in completions]
"""

TIMING = ("runtime", "per_s", "per_second", "time_", "_time", "wall")  # wall-clock figures
TRAINER = {"per_device_train_batch_size": 8, "warmup_steps": 0, "logging_steps": 2}
# Each kind: its stage config, its parents (copied from the reference run), how to kill it and where.
KINDS = {
    # 60 steps of batch 32 cross an epoch (37 steps here): the resumed run must also restore the data order
    "pretrain": dict(stage={"trainer": {"max_steps": 60, "per_device_train_batch_size": 32, "logging_steps": 5},
                            "checkpoint_every": 20}, parents=[], kill_at=45, resume_from=40),
    "sft": dict(stage={"trainer": {"max_steps": 12}, "checkpoint_every": 4}, parents=["pretrain"],
                kill_at=10, resume_from=8),
    "sft_lora": dict(stage={"kind": "sft", "from": "pretrain", "data": {"embedded": "sft"}, "eval": TINY_EVAL,
                            "lora": {"r": 4, "alpha": 8}, "checkpoint_every": 4,
                            "trainer": {**TRAINER, "max_steps": 12, "learning_rate": 1e-2}},
                     parents=["pretrain"], kill_at=10, resume_from=8),
    "reward": dict(stage={"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL, "checkpoint_every": 4,
                          "trainer": {**TRAINER, "max_steps": 12, "learning_rate": 3e-3}},
                   parents=["pretrain", "sft"], kill_at=10, resume_from=8),
    "dpo": dict(stage={"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL, "checkpoint_every": 4,
                       "trainer": {**TRAINER, "max_steps": 12, "learning_rate": 2e-3, "beta": 0.1}},
                parents=["pretrain", "sft"], kill_at=10, resume_from=8),
    "kto": dict(stage={"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL, "checkpoint_every": 4,
                       "trainer": {**TRAINER, "max_steps": 12, "learning_rate": 2e-3}},
                parents=["pretrain", "sft"], kill_at=10, resume_from=8),
    "orpo": dict(stage={"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL, "checkpoint_every": 4,
                        "trainer": {**TRAINER, "max_steps": 12, "learning_rate": 2e-3}},
                 parents=["pretrain", "sft"], kill_at=10, resume_from=8),
    "cpo": dict(stage={"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL, "checkpoint_every": 4,
                       "trainer": {**TRAINER, "max_steps": 12, "learning_rate": 2e-3, "loss_type": "simpo",
                                   "cpo_alpha": 0.0}},
                parents=["pretrain", "sft"], kill_at=10, resume_from=8),
    "ppo": dict(stage={"from": "sft", "reward_function": "resume_rewards:short", "data": {"embedded": "rl_prompts"},
                       "eval": TINY_EVAL, "checkpoint_every": 2,
                       "trainer": {"total_updates": 5, "rollout_batch_size": 16, "minibatch_size": 8,
                                   "learning_rate": 1e-3, "max_new_tokens": 16, "kl_coef": 0.02}},
                parents=["pretrain", "sft"], kill_at_call=4, resume_from=2),
    "grpo": dict(stage={"from": "sft", "reward_function": "alignpipe.data.world:judge_reward",
                        "data": {"embedded": "rl_prompts"}, "eval": TINY_EVAL, "checkpoint_every": 2,
                        "trainer": {**TRAINER, "max_steps": 6, "num_generations": 4, "max_completion_length": 12,
                                    "learning_rate": 1e-3}},
                 parents=["pretrain", "sft"], kill_at=5, resume_from=4),
    "rloo": dict(stage={"from": "sft", "reward_function": "alignpipe.data.world:judge_reward",
                        "data": {"embedded": "rl_prompts"}, "eval": TINY_EVAL, "checkpoint_every": 2,
                        "trainer": {**TRAINER, "max_steps": 6, "num_generations": 4, "max_completion_length": 12,
                                    "learning_rate": 1e-3}},
                 parents=["pretrain", "sft"], kill_at=5, resume_from=4),
}


def recipe_for(runs_dir: Path, name: str, kind: str = "sft") -> dict:
    """The tiny recipe with pretrain, sft and the stage `kind`, as configured in KINDS."""
    recipe = tiny_recipe(runs_dir, name=name)
    recipe["stages"]["pretrain"]["eval"] = {"enabled": False}
    for stage in {"pretrain", "sft", kind}:
        current = recipe["stages"].setdefault(stage, {})
        spec = KINDS[stage]
        for key, value in spec["stage"].items():
            if key == "trainer":
                current.setdefault("trainer", {}).update(value)
            else:
                current[key] = value
    return recipe


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The uninterrupted pretrain + sft (references for those kinds, parents for the rest)."""
    root = tmp_path_factory.mktemp("resume")
    (root / "resume_rewards.py").write_text(REWARD)
    sys.path.insert(0, str(root))
    path = write_yaml(root / "base.yaml", recipe_for(root / "runs", "base"))
    t0 = time.time()
    assert main(["run", str(path), "--stages", "sft"]) == 0
    print(f"\nreference pretrain+sft: {time.time() - t0:.1f}s")
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("resume_rewards", None)


def _copy_parents(root: Path, name: str, parents: list[str]) -> None:
    for parent in parents:  # copies of complete stages with the same fingerprint are skipped, not re-run
        shutil.copytree(root / "runs" / "base" / parent, root / "runs" / name / parent)


def _killed_run(root: Path, path: Path, stage: str, env: dict) -> subprocess.CompletedProcess:
    # this checkout's alignpipe, not whichever one the interpreter has installed
    imports = os.pathsep.join([str(root), str(Path(alignpipe.__file__).parents[1])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": imports, **env}
    return subprocess.run([sys.executable, "-c", KILLER, "run", str(path), "--stages", stage], env=env,
                          capture_output=True, text=True, timeout=600)


def _log_rows(stage_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]
    # the trainer's closing summary averages the loss over the steps this process ran: not comparable
    keep = [r for r in rows if "train_runtime" not in r]
    return [_untimed(r) for r in keep]


def _training_rows(stage_dir: Path) -> list[dict]:
    """The rows logged while training: those before the trainer's closing summary (evaluations after
    training, DPO's, are logged after it)."""
    rows = [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]
    return rows[:next(i for i, r in enumerate(rows) if "train_runtime" in r)]


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(t in k for t in TIMING)}


def _metrics(stage_dir: Path) -> dict:
    metrics = json.loads((stage_dir / "manifest.json").read_text())["metrics"]
    return _untimed(metrics)


def _model_files(stage_dir: Path) -> dict[str, bytes]:
    """The saved model's files, with the run's own folder name blanked (a LoRA adapter's config and card
    name their base by path); training_args.bin is a pickle of settings holding output_dir, skipped."""
    run_root = str(stage_dir.parent).encode()
    return {str(p.relative_to(stage_dir)): p.read_bytes().replace(run_root, b"<run>")
            for p in sorted((stage_dir / "model").rglob("*")) if p.is_file() and p.name != "training_args.bin"}


def assert_same_run(ref: Path, resumed: Path) -> None:
    a, b = _model_files(ref), _model_files(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # bit-exact weights, tokenizer, configs
    assert _metrics(ref) == _metrics(resumed)
    assert _log_rows(ref) == _log_rows(resumed)


def _kind_of(name: str) -> str:
    return KINDS[name]["stage"].get("kind", name)


class Recorder(TrainerCallback):
    """What one process's trainer executes: the step it starts at, each optimiser step, each logged row."""

    def __init__(self, into: dict) -> None:
        self.into, self.training = into, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.into["began_at"], self.training = state.global_step, True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False  # the stage's own evaluation after training logs too: not a training row

    def on_step_end(self, args, state, control, **kwargs):
        self.into["steps"].append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training:
            self.into["logged"].append({**logs, "step": state.global_step})


def record_trainers(monkeypatch) -> dict:
    """Adds a Recorder to every trainer this process builds (through the public add_callback)."""
    from transformers import Trainer

    seen = {"began_at": None, "steps": [], "logged": []}
    init = Trainer.__init__

    def init_and_record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Recorder(seen))

    monkeypatch.setattr(Trainer, "__init__", init_and_record)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sigkilled_stage_resumes_exactly(kind, work, capsys, monkeypatch):
    spec = KINDS[kind]
    assert _kind_of(kind) in STAGE_MODULES  # every kind is tested: a missing stage fails, never skips
    name = f"{kind.replace('_', '')}-killed"
    _copy_parents(work, name, spec["parents"])
    path = write_yaml(work / f"{name}.yaml", recipe_for(work / "runs", name, kind))
    t0 = time.time()
    if kind in ("pretrain", "sft"):  # the fixture's run is the reference
        ref_dir = work / "runs" / "base" / kind
    else:
        ref = f"{kind.replace('_', '')}-ref"
        _copy_parents(work, ref, spec["parents"])
        assert main(["run", str(write_yaml(work / f"{ref}.yaml", recipe_for(work / "runs", ref, kind))),
                     "--stages", kind]) == 0
        ref_dir = work / "runs" / ref / kind
    t_ref = time.time() - t0
    stage_dir = work / "runs" / name / kind

    # --- killed after a checkpoint
    t0 = time.time()
    env = {"KILL_AT_CALL": str(spec["kill_at_call"])} if "kill_at_call" in spec else {
        "KILL_AT_STEP": str(spec["kill_at"])}
    proc = _killed_run(work, path, kind, env)
    t_kill = time.time() - t0
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (stage_dir / "manifest.json").is_file(), proc.stderr[-3000:]
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["status"] == "running" and not (stage_dir / "model").exists()
    assert (work / "runs" / name / LOCK_NAME).read_text().startswith("pid ")  # the dead run's lock file

    # --- the same command again resumes from the newest checkpoint, and ends where the reference ended
    seen = record_trainers(monkeypatch)
    rewards = sys.modules.get("resume_rewards")
    if rewards is not None:
        rewards.CALLS["batches"].clear()
    stage_log = stage_dir / "stage.log"  # per-update rows go to the stage's log, appended by each attempt
    logged_before = len(stage_log.read_text().splitlines()) if stage_log.is_file() else 0
    t0 = time.time()
    capsys.readouterr()
    assert main(["run", str(path), "--stages", kind]) == 0
    t_resume = time.time() - t0
    out = capsys.readouterr()
    err = out.err + out.out
    assert "taking over a stale lock" in err
    assert "resuming an interrupted run" in err
    n = spec["resume_from"]
    assert_same_run(ref_dir, stage_dir)
    metrics = _metrics(stage_dir)
    if kind == "ppo":
        total = metrics["updates"]
        assert f"resuming from {stage_dir / 'checkpoints' / f'update-{n}'} (update {n})" in err, err[-2000:]
        # this process scored exactly the rollouts after the checkpoint (one reward call per update) ...
        batch = spec["stage"]["trainer"]["rollout_batch_size"]
        assert sys.modules["resume_rewards"].CALLS["batches"] == [batch] * (total - n)
        # ... and the first update it logged is N+1
        rows = [json.loads(x) for x in stage_log.read_text().splitlines()[logged_before:] if x.startswith("{")]
        assert [r["update"] for r in rows if "update" in r] == list(range(n + 1, total + 1))
    else:
        total = metrics["global_step"]
        assert f"resuming from {stage_dir / 'checkpoints' / f'checkpoint-{n}'}" in err, err[-2000:]
        # this process began at step N and executed exactly the optimiser steps N+1 .. total ...
        assert seen["began_at"] == n
        assert seen["steps"] == list(range(n + 1, total + 1))
        # ... and logged exactly the rows the reference logged while training after step N
        logged = [_untimed(r) for r in seen["logged"] if "train_runtime" not in r]
        assert logged and logged[0]["step"] > n
        assert logged == [_untimed(r) for r in _training_rows(ref_dir) if r["step"] > n]
    print(f"\n{kind}: bit-exact after SIGKILL at {spec.get('kill_at') or 'update ' + str(spec['kill_at_call'])}"
          f" (resumed from {n}, {total} total, {total - n} run after resuming); reference {t_ref:.1f}s, "
          f"killed run {t_kill:.1f}s, resume {t_resume:.1f}s")


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_the_resumed_manifest_keeps_both_wall_times(work, capsys):
    name = "sft-ctrl-c"
    _copy_parents(work, name, ["pretrain"])
    path = write_yaml(work / f"{name}.yaml", recipe_for(work / "runs", name, "sft"))
    proc = _killed_run(work, path, "sft", {"KILL_AT_STEP": "10", "KILL_SIGNAL": "SIGINT"})
    assert proc.returncode == 130, proc.stderr[-3000:]
    hint = "stage sft: interrupted at step 10; re-run the same command to resume from checkpoint-8"
    assert hint in proc.stderr, proc.stderr[-3000:]
    stage = work / "runs" / name / "sft"
    first = json.loads((stage / "manifest.json").read_text())
    assert first["status"] == "interrupted" and first["error"].endswith("resume from checkpoint-8")
    assert not (stage / "error.txt").exists()

    capsys.readouterr()
    assert main(["run", str(path), "--stages", "sft"]) == 0
    assert "resuming from" in capsys.readouterr().out
    done = json.loads((stage / "manifest.json").read_text())
    assert done["status"] == "complete" and "error" not in done and not (stage / "error.txt").exists()
    # the total counts both attempts; this attempt's own time is kept beside it
    assert 0 < done["wall_time_this_attempt_s"] < done["wall_time_s"]
    assert abs(done["wall_time_s"] - (first["wall_time_s"] + done["wall_time_this_attempt_s"])) < 0.02


@pytest.mark.slow
def test_restart_ignores_checkpoints(work, capsys):
    """--restart on an interrupted stage starts from step 0 (and, being deterministic, ends the same)."""
    name = "restarted"
    _copy_parents(work, name, ["pretrain", "sft"])
    stage_dir = work / "runs" / name / "sft"
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    manifest["status"] = "running"  # what a kill leaves behind: checkpoints and a running manifest
    (stage_dir / "manifest.json").write_text(json.dumps(manifest))
    assert (stage_dir / "checkpoints" / "checkpoint-12").is_dir()
    path = write_yaml(work / f"{name}.yaml", recipe_for(work / "runs", name))
    capsys.readouterr()
    assert main(["run", str(path), "--stages", "sft", "--restart"]) == 0
    out = capsys.readouterr()
    err = out.err + out.out
    assert "starting over (--restart)" in err and "resuming from" not in err
    assert_same_run(work / "runs" / "base" / "sft", stage_dir)


@pytest.mark.slow
def test_same_recipe_twice_gives_identical_runs(work):
    """Reproducibility: a second, independent run folder of the same recipe and seed (nothing copied)
    trains the same bits, measures the same metrics, and its manifests hold what a re-run needs."""
    path = write_yaml(work / "again.yaml", recipe_for(work / "runs", "again"))
    assert main(["run", str(path), "--stages", "sft"]) == 0
    for stage in ("pretrain", "sft"):
        first, second = work / "runs" / "base" / stage, work / "runs" / "again" / stage
        assert_same_run(first, second)
        a, b = (json.loads((d / "manifest.json").read_text()) for d in (first, second))
        # the same inputs, but for the parent's manifest (its own folder, its own timestamps)
        own = {k: v for k, v in a["inputs"].items() if not k.startswith("upstream:")}
        assert own == {k: v for k, v in b["inputs"].items() if not k.startswith("upstream:")}
        # tokenizer and template hashes match; the "model" hash covers training_args.bin, which holds the
        # folder's own path, so it differs although every weight is equal (assert_same_run above)
        assert {k: v for k, v in a["outputs"].items() if k != "model"} == \
            {k: v for k, v in b["outputs"].items() if k != "model"}
        for key in ("resolved_config", "recipe_settings", "seed", "versions", "inputs", "outputs"):
            assert a.get(key) is not None, key
        assert a["versions"]["torch"] and a["versions"]["transformers"] and a["versions"]["trl"]


# --- checkpoints that were not written to the end ----------------------------------------------------


class _Ctx:
    def __init__(self, checkpoints_dir: Path, resume: bool = True) -> None:
        self.checkpoints_dir, self.resume, self.name = checkpoints_dir, resume, "stage"


@pytest.mark.slow
def test_half_written_checkpoints_are_never_used(work, tmp_path):
    """Real checkpoints of the reference sft, then damaged the ways a kill during a save leaves them."""
    src = work / "runs" / "base" / "sft" / "checkpoints"
    steps = sorted(int(p.name.split("-")[1]) for p in src.glob("checkpoint-*"))
    assert steps == [8, 12]  # save_total_limit 2
    for damage in ("no_state", "torn_state", "wrong_step"):
        ck = tmp_path / damage
        shutil.copytree(src, ck)
        state = ck / "checkpoint-12" / "trainer_state.json"
        if damage == "no_state":  # killed before the state file (written last) was begun
            state.unlink()
        elif damage == "torn_state":  # killed while writing it
            state.write_text(state.read_text()[:100])
        else:  # a state file that belongs to another step
            state.write_text(state.read_text().replace('"global_step": 12', '"global_step": 11'))
        assert not is_complete_checkpoint(ck / "checkpoint-12")
        assert last_checkpoint(_Ctx(ck)) == str(ck / "checkpoint-8"), damage
        assert not (ck / "checkpoint-12").exists()  # removed, so a later save cannot mix with its files
    assert last_checkpoint(_Ctx(src, resume=False)) is None  # --restart
    assert is_complete_checkpoint(src / "checkpoint-12")


# --- one writer per run folder ----------------------------------------------------------------------

HOLDER = r"""
import sys, time
from alignpipe.runfolder.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_second_run_on_a_locked_folder_refuses(work, capsys):
    run_root = work / "runs" / "base"
    before = {p: p.read_bytes() for p in run_root.rglob("*") if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(["run", str(work / "base.yaml"), "--stages", "sft"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith("alignpipe: error: ")
        assert f"another alignpipe run is writing this run folder (pid {holder.pid} " in err
        assert str(run_root) in err and "fix:" in err
        with pytest.raises(RunError, match="another alignpipe run"):
            RunLock(run_root).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died holding it: the kernel released the lock, the next run takes it over
    assert (run_root / LOCK_NAME).read_text().startswith(f"pid {holder.pid} ")
    assert main(["run", str(work / "base.yaml"), "--stages", "sft"]) == 0
    assert "taking over a stale lock" in capsys.readouterr().err
    assert not (run_root / LOCK_NAME).exists()
    after = {p: p.read_bytes() for p in run_root.rglob("*") if p.is_file()}
    assert after == before


def test_lock_is_released_after_use(tmp_path):
    lock = RunLock(tmp_path / "r")
    with lock:
        assert (tmp_path / "r" / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    assert not (tmp_path / "r" / LOCK_NAME).exists()
    with RunLock(tmp_path / "r"):  # free again
        pass
