"""Experiment trackers through real tiny runs: MLflow with a local file store (read back with MLflow's own
client), W&B in offline mode (its run file parsed with W&B's own protobuf records), trackio locally.
Each stage is one tracker run with its lineage; the figures logged equal the manifest's; no secret leaks."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.errors import RecipeError
from alignpipe.pipeline.validate import validate
from alignpipe.recipe.parse import load_recipe
from alignpipe.runtime import tracking
from conftest import TINY_EVAL, stage_manifest, tiny_recipe, write_yaml

SECRETS = {"HF_TOKEN": "hf_sentinelTOKENnotToBeLogged", "WANDB_API_KEY": "sentinelKEYnotToBeLogged0123456789abcd",
           "OPENAI_API_KEY": "sk-sentinelNotToBeLogged"}
PPO = {"from": "sft", "reward_function": "alignpipe.data.world:judge_reward", "data": {"embedded": "rl_prompts"},
       "eval": TINY_EVAL, "trainer": {"total_updates": 3, "rollout_batch_size": 16, "minibatch_size": 8,
                                      "learning_rate": 1e-3, "max_new_tokens": 12}}


def _recipe(root: Path, name: str, trackers: list[str]) -> Path:
    recipe = tiny_recipe(root / "runs", name=name, extra_stages={"ppo": PPO}, tracking=trackers)
    recipe["stages"]["pretrain"]["eval"] = {"enabled": False}
    recipe["stages"]["sft"]["gates"] = ["judge_pass_rate >= 0"]
    return write_yaml(root / f"{name}.yaml", recipe)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretrained tiny model, copied into each tracker's run folder (skipped there, not re-run)."""
    root = tmp_path_factory.mktemp("tracking")
    assert main(["run", str(_recipe(root, "base", [])), "--stages", "pretrain"]) == 0
    return root


def _run(base: Path, name: str, trackers: list[str], stages: str, monkeypatch) -> Path:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    shutil.copytree(base / "runs" / "base" / "pretrain", base / "runs" / name / "pretrain")
    assert main(["run", str(_recipe(base, name, trackers)), "--stages", stages]) == 0
    return base / "runs" / name


def _no_secrets(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in SECRETS.values():
                assert value.encode() not in data, (path, value)


@pytest.mark.slow
def test_mlflow_file_store(base, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs_dir = _run(base, "mlf", ["tensorboard", "mlflow"], "sft,ppo", monkeypatch)
    store = runs_dir / "mlruns"
    client = MlflowClient(store.resolve().as_uri())
    experiment = client.get_experiment_by_name("mlf")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == {"sft", "ppo"}  # one run per stage that ran (pretrain was skipped)
    for stage in ("sft", "ppo"):
        run, manifest = found[stage], stage_manifest(runs_dir / stage)
        assert run.info.status == "FINISHED"
        # the lineage as tags
        tags = run.data.tags
        assert tags["stage"] == stage and tags["kind"] == manifest["kind"] and tags["recipe"] == "mlf"
        assert tags["parent"] == manifest["parent"]["stage"]
        assert tags["parent_manifest_sha256"] == manifest["parent"]["manifest_sha256"]
        assert tags["fingerprint"] == manifest["fingerprint"]
        # the manifest's figures, by the manifest's names, with the manifest's values
        expected = tracking.numeric(manifest["metrics"])
        assert expected and {k: run.data.metrics[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert found["sft"].data.metrics["gate/0"] == 1.0 and found["sft"].data.metrics["gates_missed"] == 0.0
    # the trainer's rows (transformers' MLflow callback, into the same run) and PPO's own per-update rows
    assert [m.step for m in client.get_metric_history(found["sft"].info.run_id, "loss")] == [2, 4, 6, 8, 10]
    log = [json.loads(line) for line in (runs_dir / "ppo" / "train_log.jsonl").read_text().splitlines()]
    history = client.get_metric_history(found["ppo"].info.run_id, "reward_normalised")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(r["update"], pytest.approx(r["reward_normalised"])) for r in log]
    assert found["sft"].data.params["learning_rate"] == "0.001"  # TrainingArguments, logged by transformers
    _no_secrets(store)


def _wandb_records(run_file: Path) -> list:
    """The records of a W&B run file: a 7-byte header (`:W&B`, magic, version), then LevelDB-log chunks of
    32 KiB blocks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


@pytest.mark.slow
def test_wandb_offline(base, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs_dir = _run(base, "wdb", ["wandb"], "sft", monkeypatch)
    stage_dir = runs_dir / "sft"
    run_files = list((stage_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = _wandb_records(run_files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "sft" and run.project == "wdb" and run.run_group == "wdb"
    # the config given to wandb.init travels in the run record; later updates (transformers') as config records
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    config.update({u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
                   for u in r.config.update})
    manifest = stage_manifest(stage_dir)
    lineage = {k: config[k] for k in ("stage", "kind", "parent", "parent_manifest_sha256", "fingerprint")}
    assert lineage == {"stage": "sft", "kind": "sft", "parent": "pretrain", "fingerprint": manifest["fingerprint"],
                       "parent_manifest_sha256": manifest["parent"]["manifest_sha256"]}
    assert config["learning_rate"] == 0.001  # TrainingArguments, logged by transformers' callback
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    expected = tracking.numeric(manifest["metrics"])
    assert {k: summary[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["train/global_step"] for h in history if "train/loss" in h] == [2, 4, 6, 8, 10]
    assert "exit" in kinds  # the run was finished
    _no_secrets(stage_dir / "wandb")


@pytest.mark.slow
def test_trackio_local(base, monkeypatch):
    trackio = pytest.importorskip("trackio")
    from trackio import utils

    folder = Path(utils.TRACKIO_DIR)  # conftest points TRACKIO_DIR at a temp folder before trackio is imported
    runs_dir = _run(base, "trk", ["trackio"], "sft", monkeypatch)
    manifest = stage_manifest(runs_dir / "sft")
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs("trk") == ["sft"]  # one run per stage, project = recipe
    logged = {}
    for row in SQLiteStorage.get_logs("trk", "sft"):  # read back with trackio's own storage
        logged.update({k: v for k, v in row.items() if k not in ("step", "timestamp")})
    # the manifest's figures, by the manifest's names, with the manifest's values
    expected = tracking.numeric(manifest["metrics"])
    assert expected and {k: logged[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    _no_secrets(folder)
    assert trackio and manifest["status"] == "complete"


def test_validate_names_a_missing_tracker_package_and_its_extra(tmp_path, monkeypatch):
    path = write_yaml(tmp_path / "t.yaml", tiny_recipe(tmp_path / "runs", tracking=["tensorboard", "mlflow"]))
    validate(load_recipe(path))  # installed: fine
    monkeypatch.setitem(tracking.TRACKERS, "mlflow", ("alignpipe_no_such_module", "mlflow"))
    with pytest.raises(RecipeError, match=r"tracking\[1\]: tracker 'mlflow' needs the alignpipe_no_such_module "
                                          r"package, which is not installed; fix: pip install 'alignpipe\[mlflow\]'"):
        validate(load_recipe(path))
    bad = write_yaml(tmp_path / "u.yaml", tiny_recipe(tmp_path / "runs", tracking=["neptune"]))
    with pytest.raises(RecipeError, match="unknown tracker 'neptune'"):
        validate(load_recipe(bad))
