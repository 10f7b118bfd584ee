"""Run folders: manifests and PPO checkpoints are written atomically; a stage killed mid-run never looks
complete.

The atomic-write tests SIGKILL a real writer process at a fixed point of its write: after the new
bytes are written and flushed (at `os.fsync`) and just before the rename (at `os.replace`). The file
a reader finds afterwards must be the old one, whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignpipe.errors import AlignpipeError
from alignpipe.runfolder import files
from alignpipe.runfolder import manifests as runs
import alignpipe
from conftest import tiny_recipe, write_yaml


def test_write_json_atomic_leaves_no_temp(tmp_path):
    path = tmp_path / "m.json"
    files.write_json_atomic(path, {"status": "running"})
    files.write_json_atomic(path, {"status": "complete"})
    assert json.loads(path.read_text()) == {"status": "complete"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_jsonl_reader_skips_blank_lines_and_names_a_torn_one_unless_told_to_skip_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    files.write_jsonl_atomic(path, [{"a": 1}, {"a": 2}])
    assert files.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": ')  # a kill mid-append
    assert files.read_jsonl(path, skip_torn=True) == [{"a": 1}, {"a": 2}]
    with pytest.raises(AlignpipeError) as err:
        files.read_jsonl(path)
    assert err.value.where == f"{path}:4"
    assert files.read_jsonl(tmp_path / "none.jsonl", missing_ok=True) == []


def test_torn_manifest_is_not_complete(tmp_path):
    (tmp_path / "manifest.json").write_text('{"status": "compl')
    assert not runs.is_complete(tmp_path)


@pytest.mark.slow
def test_killed_stage_is_not_complete_and_reruns(tmp_path):
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["stages"].pop("sft")
    recipe["stages"]["pretrain"]["trainer"].update(max_steps=100000, save_steps=5)
    path = write_yaml(tmp_path / "long.yaml", recipe)
    stage_dir = tmp_path / "runs" / "tiny" / "pretrain"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((stage_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            time.sleep(0.2)
        assert runs.read_manifest(stage_dir)["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not runs.is_complete(stage_dir)

    # the same command with a short run finishes; a changed config starts over, the result is complete
    from alignpipe.cli import main

    assert main(["run", str(path), "--set", "stages.pretrain.trainer.max_steps=10",
                 "--set", "stages.pretrain.eval.enabled=false"]) == 0
    assert runs.is_complete(stage_dir)


# --- atomic writes, proven by killing the writer -------------------------------------------------------

# Runs `SETUP` (the old state, written normally), then arms a SIGKILL at the first call of os.<AT> and
# runs `WRITE` (the new state), which must not survive. The kill is a real one: no cleanup, no finally.
KILL_DURING_WRITE = r"""
import os, signal, sys
from pathlib import Path
root, at = Path(sys.argv[1]), sys.argv[2]
exec(sys.argv[3])  # SETUP
real = getattr(os, at)
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(os, at, die)
exec(sys.argv[4])  # WRITE
print("the write finished without reaching os." + at, flush=True)
"""


def kill_during_write(root: Path, at: str, setup: str, write: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(alignpipe.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(root), at, setup, write], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-2000:]


MANIFEST_SETUP = """
from alignpipe.runfolder.manifests import StageRun
run = StageRun(root, {"stage": "sft", "config": {"x": 1}})
run.start()
"""
MANIFEST_WRITE = """
run.finish({"judge_pass_rate": 0.5, "padding": "x" * 100000})  # large: a torn write would show
"""


@pytest.mark.slow
@pytest.mark.parametrize("at", ["fsync", "replace"])
def test_manifest_killed_between_write_and_rename_keeps_the_old_one(tmp_path, at):
    kill_during_write(tmp_path, at, MANIFEST_SETUP, MANIFEST_WRITE)
    manifest = runs.read_manifest(tmp_path)  # parses: whole
    assert manifest["status"] == "running" and "metrics" not in manifest
    assert manifest["stage"] == "sft" and manifest["config"] == {"x": 1}
    assert not runs.is_complete(tmp_path)
    # the new bytes were written, but only to a temp file beside it
    temps = [p for p in tmp_path.iterdir() if p.name != runs.MANIFEST]
    assert len(temps) == 1 and temps[0].name.startswith(f".{runs.MANIFEST}.tmp-")


PPO_SETUP = """
import torch
from alignpipe.rl import state
from alignpipe.rl.ppo_math import AdaptiveKLController
torch.manual_seed(0)
policy = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(policy.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
kl = AdaptiveKLController(0.05, 1.0, 100)

def step(k):
    policy(torch.ones(1, 4)).sum().backward()
    optimizer.step(); scheduler.step(); kl.update(0.5 * k, 8); optimizer.zero_grad()

step(1)
state.save(root, 2, policy, optimizer, scheduler, kl)
torch.save(dict(policy.state_dict()), root / "weights-at-2.pt")
"""
PPO_WRITE = """
step(2)
state.save(root, 4, policy, optimizer, scheduler, kl)
"""


@pytest.mark.slow
def test_ppo_checkpoint_killed_between_write_and_rename_keeps_the_old_one(tmp_path):
    import torch

    from alignpipe.rl import state
    from alignpipe.rl.ppo_math import AdaptiveKLController

    kill_during_write(tmp_path, "replace", PPO_SETUP, PPO_WRITE)
    assert [p.name for p in state.complete(tmp_path)] == ["update-2"]
    assert not (tmp_path / "update-4").exists()
    assert state.newest(tmp_path) == tmp_path / "update-2"
    # update-2 loads whole and holds the state after one step
    policy = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    kl = AdaptiveKLController(0.05, 1.0, 100)
    assert state.load(tmp_path / "update-2", policy, optimizer, scheduler, kl) == 2
    saved = torch.load(tmp_path / "weights-at-2.pt", weights_only=True)
    assert all(torch.equal(policy.state_dict()[k], saved[k]) for k in saved)
    assert optimizer.state_dict()["state"][0]["step"].item() == 1 and scheduler.last_epoch == 1
    assert kl.value != 0.05  # the controller's moved coefficient came back too
def test_manifests_from_before_result_neutral_settings_still_match():
    """A stage completed by an alignpipe that hashed logging settings too is skipped, not re-trained."""
    from alignpipe.pipeline.plan import result_config, same_result

    parts = {"config": {"trainer": {"learning_rate": 1e-3, "logging_steps": 5}, "checkpoint_every": 0}, "seed": 0}
    legacy = {"fingerprint": runs.fingerprint_json(parts), "inputs": json.loads(json.dumps(parts))}
    now = runs.fingerprint_json({**parts, "config": result_config(parts["config"])})
    assert legacy["fingerprint"] != now and same_result(legacy, now)
    changed = {**parts, "config": {**parts["config"], "trainer": {"learning_rate": 5e-4}}}
    assert not same_result(legacy, runs.fingerprint_json({**changed, "config": result_config(changed["config"])}))
