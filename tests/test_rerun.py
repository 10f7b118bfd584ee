"""A re-run never loses the last good version of a stage: it trains beside it (`.next/<stage>`), is
swapped in only when complete, and the previous version stays in the stage's history (restorable).
Run folders are portable (LoRA bases are named relative to the run folder), and a gate-only change is
re-checked on the recorded metrics without training.

The base run (tiny pretrain + LoRA sft) is built once per module; each test works on its own copy.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alignpipe.runfolder import manifests as runs
from alignpipe.runfolder.files import write_json_atomic

from alignpipe.cli import main
from alignpipe.errors import RunError
from alignpipe.models.loading import load_stage_model
from alignpipe.recipe.schema import ModelSpec
from alignpipe.runfolder import versions as stage_versions
from conftest import tiny_recipe, write_yaml
from kill_harness import KILLER



def base_recipe(runs_dir: Path, **sft_trainer) -> dict:
    data = tiny_recipe(runs_dir)
    data["stages"]["pretrain"]["eval"] = {"enabled": False}
    sft = data["stages"]["sft"]
    sft.update(lora={"r": 4, "alpha": 8}, eval={"enabled": False})
    sft["trainer"].update(learning_rate=2e-2, **sft_trainer)
    return data


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A complete tiny run folder: pretrain and a LoRA sft (10 steps)."""
    root = tmp_path_factory.mktemp("rerun")
    assert main(["run", str(write_yaml(root / "base.yaml", base_recipe(root / "runs")))]) == 0
    return root / "runs" / "tiny"


def copy_run(base_run: Path, runs_dir: Path) -> Path:
    shutil.copytree(base_run, runs_dir / "tiny")
    return runs_dir / "tiny"


def files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_rerun_keeps_the_current_version_then_resumes_and_swaps(base_run, tmp_path, capfd):
    run = copy_run(base_run, tmp_path / "runs")
    sft = run / "sft"
    before, manifest_before = files(sft / "model"), (sft / "manifest.json").read_bytes()
    # checkpoint_every is a stage key (not TRL's): a checkpoint at step 10, a kill at 12
    data = base_recipe(tmp_path / "runs", max_steps=20)
    data["stages"]["sft"]["checkpoint_every"] = 5
    changed = write_yaml(tmp_path / "changed.yaml", data)

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(killer), "run", str(changed), "--stages", "sft"],
                          env={**os.environ, "KILL_AT_STEP": "12"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # the current version is exactly as it was: same bytes, complete, loadable; the attempt is beside it
    assert files(sft / "model") == before and (sft / "manifest.json").read_bytes() == manifest_before
    assert runs.require_complete(sft, needed_by="a downstream stage")["status"] == "complete"
    load_stage_model(sft, ModelSpec())
    attempt = stage_versions.next_dir(sft)
    assert attempt == run / ".next" / "sft"
    assert runs.read_manifest(attempt)["status"] == "running"
    assert (attempt / "checkpoints" / "checkpoint-10" / "trainer_state.json").is_file()
    capfd.readouterr()
    assert main(["show", str(run)]) == 0
    assert "new attempt: version 2 [running]" in capfd.readouterr().out
    # meanwhile the old recipe still finds its stage complete (what downstream stages would load)
    old_recipe = write_yaml(tmp_path / "old.yaml", base_recipe(tmp_path / "runs"))
    assert main(["run", str(old_recipe), "--stages", "sft"]) == 0
    err = capfd.readouterr().err
    assert "sft: complete with the same config" in err and "unfinished attempt for another config" in err
    assert files(sft / "model") == before

    # the same command resumes the attempt from its checkpoint and swaps it in
    assert main(["run", str(changed), "--stages", "sft"]) == 0
    out, err = capfd.readouterr()
    assert "resuming from" in out + err and "checkpoint-10" in out + err
    assert "version 2 swapped in" in err
    assert runs.read_manifest(sft)["version"] == 2 and runs.is_complete(sft)
    assert runs.read_manifest(sft)["metrics"]["global_step"] == 20
    assert not attempt.exists()
    old = run / ".history" / "sft" / "1"
    assert files(old / "model") == before and (old / "manifest.json").read_bytes() == manifest_before

    # bit-exact: the resumed attempt equals an uninterrupted run of the changed config
    ref_runs = tmp_path / "ref"
    copy_run(base_run, ref_runs)
    data["runs_dir"] = str(ref_runs)
    assert main(["run", str(write_yaml(tmp_path / "ref.yaml", data)), "--stages", "sft"]) == 0
    weights = "adapter_model.safetensors"  # (adapter_config.json and README.md name the run folder's path)
    assert files(sft / "model")[weights] == files(ref_runs / "tiny" / "sft" / "model")[weights]

    # history is listed, and restore brings version 1 back (version 2 goes to the history)
    capfd.readouterr()
    assert main(["show", str(run)]) == 0
    assert "history: version 1 [complete]" in capfd.readouterr().out
    assert main(["restore", str(sft), "1"]) == 0
    assert files(sft / "model") == before and runs.read_manifest(sft)["version"] == 1
    assert runs.read_manifest(run / ".history" / "sft" / "2")["version"] == 2
    assert main(["restore", str(sft), "7"]) == 2
    assert "no complete version 7" in capfd.readouterr().err


@pytest.mark.slow
def test_failed_save_leaves_the_current_stage_as_it_was(base_run, tmp_path, capfd, monkeypatch):
    from alignpipe.stages import training
    run = copy_run(base_run, tmp_path / "runs")
    sft = run / "sft"
    before = files(sft)

    def disk_full(trainer, tokenizer, model_dir):  # the disk fills up half-way through the weights
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        (Path(model_dir) / "adapter_model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(model_dir) / "adapter_model.safetensors"))

    monkeypatch.setattr(training, "save_stage_model", disk_full)  # the stage imports it when it runs
    changed = write_yaml(tmp_path / "changed.yaml", base_recipe(tmp_path / "runs", max_steps=12))
    capfd.readouterr()
    assert main(["run", str(changed), "--stages", "sft"]) == 2
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("alignpipe: error")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "untouched" in errors[0]
    assert files(sft) == before  # every file of the stage folder, manifest included
    assert runs.read_manifest(stage_versions.next_dir(sft))["status"] == "failed"

    monkeypatch.undo()  # space again: the same command trains the attempt and swaps it in
    assert main(["run", str(changed), "--stages", "sft"]) == 0
    assert runs.read_manifest(sft)["version"] == 2
    assert files(run / ".history" / "sft" / "1") == before


@pytest.mark.slow
def test_moved_run_folder_loads_runs_downstream_and_serves(base_run, tmp_path, capfd, monkeypatch):
    run = copy_run(base_run, tmp_path / "old")
    moved = tmp_path / "elsewhere" / "tiny"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    assert not run.exists()

    for stage in ("pretrain", "sft"):  # the LoRA sft finds its base by name in the moved folder
        load_stage_model(moved / stage, ModelSpec())
    assert main(["show", str(moved)]) == 0
    assert main(["export", str(moved / "sft"), str(tmp_path / "export")]) == 0
    assert main(["report", str(moved), "--no-reward-scoring"]) == 0
    assert (moved / "report.md").is_file()
    monkeypatch.setattr("sys.stdin", io.StringIO("what is 2 plus 3?\n/quit\n"))
    assert main(["chat", str(moved / "sft"), "--max-new-tokens", "4"]) == 0
    assert "assistant> " in capfd.readouterr().out

    # a downstream LoRA stage runs there: its parents are skipped (their fingerprints did not change)
    data = base_recipe(moved.parent)
    data["stages"]["dpo"] = {"from": "sft", "data": {"embedded": "pairs"}, "lora": {"r": 4, "alpha": 8},
                             "eval": {"enabled": False},
                             "trainer": {"max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1}}
    assert main(["run", str(write_yaml(tmp_path / "more.yaml", data)), "--stages", "dpo"]) == 0
    assert capfd.readouterr().err.count("skipped") == 2
    assert runs.read_manifest(moved / "dpo")["base_model"]["stage"] == "sft"
    load_stage_model(moved / "dpo", ModelSpec())  # dpo adapter over sft adapter over pretrain


@pytest.mark.slow
def test_gate_only_change_rechecks_without_training(base_run, tmp_path, capfd):
    run = copy_run(base_run, tmp_path / "runs")
    before = files(run)

    def gated(threshold: float) -> Path:
        data = base_recipe(tmp_path / "runs")
        data["stages"]["sft"]["gates"] = [f"train_loss <= {threshold}", "global_step >= pretrain.global_step / 8"]
        return write_yaml(tmp_path / f"gated{threshold}.yaml", data)

    capfd.readouterr()
    assert main(["run", str(gated(100.0))]) == 0
    err = capfd.readouterr().err
    assert err.count("skipped") == 2 and "re-checked on the recorded metrics" in err
    results = json.loads((run / "sft" / "gates.json").read_text())
    assert [r["passed"] for r in results] == [True, True]

    assert main(["run", str(gated(1e-4))]) == 2
    line = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("alignpipe: error")][0]
    assert "gate missed" in line and "train_loss" in line and "stages.sft.gates[0]" in line
    assert json.loads((run / "sft" / "gates.json").read_text())[0]["passed"] is False

    # nothing was trained or rewritten: every file but gates.json is as it was, and no attempt exists
    after = files(run)
    after.pop("sft/gates.json")
    assert after == before and not (run / ".next").exists()

    # `alignpipe gates` re-checks the recorded gates, or a recipe's
    assert main(["gates", str(run)]) == 2
    assert main(["gates", str(run), "--recipe", str(gated(100.0))]) == 0
    assert "gate passed: stage 'sft': train_loss" in capfd.readouterr().out
    assert all(r["passed"] for r in json.loads((run / "sft" / "gates.json").read_text()))


# --- the swap and the references, on folders written by hand (no training) ----------------------


def _stage(folder: Path, version: int, status: str = "complete", **extra) -> Path:
    folder.mkdir(parents=True)
    write_json_atomic(folder / "manifest.json", {"schema": 1, "status": status, "version": version,
                                                "fingerprint": f"fp{version}", **extra})
    (folder / "model").mkdir()
    (folder / "model" / "weights").write_text(f"v{version}")
    return folder


def test_a_swap_cut_short_is_finished_on_the_next_run(tmp_path):
    sft = tmp_path / "sft"
    # killed after the attempt completed, before the swap: it is swapped in
    _stage(sft, 1), _stage(stage_versions.next_dir(sft), 2)
    assert "swapped in" in stage_versions.settle(sft)
    assert (sft / "model" / "weights").read_text() == "v2"
    assert (stage_versions.history_root(sft) / "1" / "model" / "weights").read_text() == "v1"
    # killed after the exchange, before the old version moved to the history
    shutil.rmtree(stage_versions.history_root(sft) / "1")
    _stage(stage_versions.next_dir(sft), 1)
    assert "into the history" in stage_versions.settle(sft)
    assert (sft / "model" / "weights").read_text() == "v2" and not stage_versions.next_dir(sft).exists()
    # killed between two plain renames (no stage folder for an instant)
    shutil.move(str(sft), str(stage_versions.next_dir(sft)))
    assert "finished" in stage_versions.settle(sft)
    assert (sft / "model" / "weights").read_text() == "v2"
    assert stage_versions.settle(sft) is None


def test_a_lora_base_is_found_in_history_and_kept_from_pruning(tmp_path):
    run = tmp_path / "run"
    pre = _stage(run / "pretrain", 1)
    sha = runs.manifest_hash(pre)
    child = _stage(run / "sft", 1, base_model={"stage": "pretrain", "manifest_sha256": sha})
    assert stage_versions.base_of(child) == pre
    for version in (2, 3):  # pretrain re-run twice; --keep 0 would prune, but sft stands on version 1
        _stage(stage_versions.next_dir(pre), version)
        stage_versions.promote(stage_versions.next_dir(pre), pre, keep=0)
    assert [v for v, _, _ in stage_versions.history(pre)] == [1]
    assert stage_versions.base_of(child) == stage_versions.history_root(pre) / "1"
    shutil.rmtree(stage_versions.history_root(pre) / "1")
    with pytest.raises(RunError, match="neither the current one nor in its history"):
        stage_versions.base_of(child)
    # a folder written before relative references: an absolute path that no longer exists, found by name
    legacy = _stage(run / "dpo", 1, base_model={"stage_dir": "/gone/elsewhere/tiny/sft"})
    assert stage_versions.base_of(legacy) == run / "sft"
