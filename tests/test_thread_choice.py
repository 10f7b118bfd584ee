"""Torch threads decided from the machine and the recipe only (ALIGNPIPE_THREADS): unset keeps the process's
threads, a number is taken as asked, `auto` shares the usable cores among the stages the recipe's plan runs at
once (at most 2); the trainer stages (pretrain, sft, reward, dpo) record their choice in the manifest, with the
machine facts that decide the numerics; and a busy neighbour slows a run down but never changes its figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignpipe.cli import main
from alignpipe.errors import RunError
from alignpipe.recipe.parse import load_recipe
from alignpipe.runtime import threads as thread_choice
from conftest import TINY_EVAL, stage_manifest, tiny_recipe, write_yaml

REWARD = {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
          "trainer": {"max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 0,
                      "logging_steps": 1}}
TIMING = ("runtime", "per_s", "per_second", "time", "wall")  # wall-clock figures: the only ones allowed to differ
DEFAULT_RECIPE = "recipes/default.yaml"


def test_auto_shares_the_usable_cores_among_the_stages_the_recipe_runs_at_once(monkeypatch):
    recipe = load_recipe(DEFAULT_RECIPE)
    order = recipe.order(None)

    def at_once(name, cores):
        return thread_choice.stages_at_once(order, recipe.start_after, recipe.evaluated_with, name, cores)

    # the default recipe's plan on 2 cores: pretrain, sft one at a time; then reward-then-ppo beside dpo, which
    # needs the reward model only to score its evaluation
    assert {s: at_once(s, 2) for s in order} == {"pretrain": 1, "sft": 1, "reward": 2, "dpo": 2, "ppo": 2}
    assert {at_once(s, 1) for s in order} == {1}  # one core: one stage at a time
    monkeypatch.setenv(thread_choice.ENV, "auto")
    try:
        assert thread_choice.choose(at_once=1, cores=2)["threads"] == 2
        beside = thread_choice.choose(at_once=2, cores=2)
        assert beside["threads"] == 1 and "2 usable core(s) shared by 2 stage(s)" in beside["why"]
        assert thread_choice.choose(at_once=1, cores=1)["threads"] == 1
        assert thread_choice.choose(at_once=1, cores=16)["threads"] == thread_choice.AUTO_MAX_THREADS
        assert thread_choice.choose(at_once=3, cores=16)["threads"] == thread_choice.AUTO_MAX_THREADS
        assert thread_choice.choose(at_once=3, cores=2)["threads"] == 1  # never fewer than one
    finally:
        torch.set_num_threads(1)


def test_a_number_of_threads_is_taken_as_asked_and_unset_keeps_the_process_threads(monkeypatch):
    try:
        monkeypatch.setenv(thread_choice.ENV, "3")
        asked = thread_choice.choose(at_once=2, cores=1)  # whatever the machine and the plan
        assert asked == {"threads": 3, "why": "ALIGNPIPE_THREADS=3"} and torch.get_num_threads() == 3
        monkeypatch.delenv(thread_choice.ENV)
        torch.set_num_threads(2)  # what OMP_NUM_THREADS=2 gives the CLI's process
        kept = thread_choice.choose(at_once=1, cores=2)
        assert kept["threads"] == 2 and "OMP_NUM_THREADS" in kept["why"] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    thread_choice.check_env()  # unset: fine
    for bad in ("two", "0", "-1", ""):
        monkeypatch.setenv(thread_choice.ENV, bad)
        with pytest.raises(RunError, match="ALIGNPIPE_THREADS=.* is neither auto nor a number.*fix: set it to auto"):
            thread_choice.check_env()


@pytest.mark.slow
def test_a_bad_thread_setting_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    recipe = _short_recipe(tmp_path)
    monkeypatch.setenv(thread_choice.ENV, "max")
    assert main(["run", str(recipe)]) == 2
    assert "ALIGNPIPE_THREADS='max' is neither auto nor a number" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_pretrain_records_its_thread_choice(tiny, monkeypatch):
    monkeypatch.setenv(thread_choice.ENV, "auto")
    assert main(["run", str(tiny), "--stages", "pretrain"]) == 0
    metrics = json.loads((tiny.parent / "runs" / "tiny" / "pretrain" / "manifest.json").read_text())["metrics"]
    assert metrics["torch_threads"] in (1, 2) and metrics["torch_threads_why"].startswith("auto: ")
    assert torch.get_num_threads() == 1  # later stages start from one thread again


@pytest.mark.slow
def test_pretrain_records_its_thread_choice(tiny, monkeypatch):
    monkeypatch.setenv(thread_choice.ENV, "auto")
    assert main(["run", str(tiny), "--stages", "pretrain"]) == 0
    metrics = json.loads((tiny.parent / "runs" / "tiny" / "pretrain" / "manifest.json").read_text())["metrics"]
    assert metrics["torch_threads"] in (1, 2) and metrics["torch_threads_why"].startswith("auto: ")
    assert torch.get_num_threads() == 1  # later stages start from one thread again


def _short_recipe(tmp_path, **reward):
    """pretrain (a few steps: only the later stages are looked at), sft and reward."""
    data = tiny_recipe(tmp_path / "runs", extra_stages={"reward": {**REWARD, **reward}})
    data["stages"]["pretrain"]["trainer"]["max_steps"] = 10
    return write_yaml(tmp_path / "tiny.yaml", data)


def _untimed(folder) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _weights(stage_dir) -> dict:
    return load_file(str(next((stage_dir / "model").glob("*.safetensors"))))


@pytest.mark.slow
def test_a_busy_neighbour_slows_a_run_but_never_changes_its_figures(tmp_path, monkeypatch):
    """The same short recipe under ALIGNPIPE_THREADS=auto (2 threads on a 2-core machine), once idle and once with
    a process spinning on the other core: every stage's metrics (wall-clock figures aside), logged rows and
    weights are bit-identical, and the manifests name the threads and the machine facts behind them."""
    recipe = _short_recipe(tmp_path, lora={"r": 4, "alpha": 8})
    monkeypatch.setenv(thread_choice.ENV, "auto")
    idle, busy = tmp_path / "runs" / "tiny", tmp_path / "busy" / "tiny"
    assert main(["run", str(recipe)]) == 0
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert main(["run", str(recipe), "--set", f"runs_dir={tmp_path / 'busy'}"]) == 0
    finally:
        spinner.kill()
        spinner.wait()
    threads = min(thread_choice.AUTO_MAX_THREADS, thread_choice.usable_cores())
    for stage in ("pretrain", "sft", "reward"):
        a, b = stage_manifest(idle / stage), stage_manifest(busy / stage)
        assert a["metrics"]["torch_threads"] == b["metrics"]["torch_threads"] == threads, stage
        assert a["machine"] == b["machine"] and a["machine"]["cpu_capability"] and a["machine"]["cpu_model"]
        assert a["versions"] == b["versions"]
        timed = {k for k in a["metrics"] if any(t in k for t in TIMING)}
        assert {k: v for k, v in a["metrics"].items() if k not in timed} == \
               {k: v for k, v in b["metrics"].items() if k not in timed}, stage
        assert _untimed(idle / stage) == _untimed(busy / stage), stage
        wa, wb = _weights(idle / stage), _weights(busy / stage)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), stage
    assert torch.get_num_threads() == 1


@pytest.mark.slow
def test_a_stage_run_alone_trains_on_the_threads_of_its_place_in_the_plan(tmp_path, monkeypatch):
    """Two sibling stages (two sfts from one pretrain) share the cores in the plan; re-run alone with `--stages`,
    a sibling takes the same threads and gives the same figures, so `make dpo` trains dpo as `make pipeline` does."""
    data = tiny_recipe(tmp_path / "runs")
    data["stages"]["pretrain"]["trainer"]["max_steps"] = 10
    data["stages"]["sft_b"] = {**data["stages"]["sft"], "kind": "sft", "trainer": {**data["stages"]["sft"]["trainer"],
                                                                     "learning_rate": 2e-3}}
    recipe = write_yaml(tmp_path / "tiny.yaml", data)
    monkeypatch.setenv(thread_choice.ENV, "auto")
    monkeypatch.setattr(thread_choice, "usable_cores", lambda: 2)
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "runs" / "tiny"
    first = stage_manifest(run / "sft_b")
    assert first["metrics"]["torch_threads"] == 1 and "shared by 2 stage(s)" in first["metrics"]["torch_threads_why"]
    assert stage_manifest(run / "pretrain")["metrics"]["torch_threads"] == 2
    assert main(["run", str(recipe), "--stages", "sft_b", "--force"]) == 0
    again = stage_manifest(run / "sft_b")
    assert again["version"] == first["version"] + 1
    assert again["metrics"]["torch_threads"] == 1
    timed = {k for k in first["metrics"] if any(t in k for t in TIMING)}
    assert {k: v for k, v in first["metrics"].items() if k not in timed} == \
           {k: v for k, v in again["metrics"].items() if k not in timed}
    assert torch.get_num_threads() == 1
