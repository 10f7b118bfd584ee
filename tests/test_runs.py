"""Run folders: manifests are written atomically; a stage killed mid-run never looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from alignpipe import runs
from conftest import tiny_recipe, write_yaml


def test_write_json_atomic_leaves_no_temp(tmp_path):
    path = tmp_path / "m.json"
    runs.write_json_atomic(path, {"status": "running"})
    runs.write_json_atomic(path, {"status": "complete"})
    assert json.loads(path.read_text()) == {"status": "complete"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_torn_manifest_is_not_complete(tmp_path):
    (tmp_path / "manifest.json").write_text('{"status": "compl')
    assert not runs.is_complete(tmp_path)


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


def test_manifests_from_before_result_neutral_settings_still_match():
    """A stage completed by an alignpipe that hashed logging settings too is skipped, not re-trained."""
    from alignpipe.runner import result_config, same_result

    parts = {"config": {"trainer": {"learning_rate": 1e-3, "logging_steps": 5}, "checkpoint_every": 0}, "seed": 0}
    legacy = {"fingerprint": runs.fingerprint_json(parts), "inputs": json.loads(json.dumps(parts))}
    now = runs.fingerprint_json({**parts, "config": result_config(parts["config"])})
    assert legacy["fingerprint"] != now and same_result(legacy, now)
    changed = {**parts, "config": {**parts["config"], "trainer": {"learning_rate": 5e-4}}}
    assert not same_result(legacy, runs.fingerprint_json({**changed, "config": result_config(changed["config"])}))
