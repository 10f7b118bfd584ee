"""Torch threads chosen by measuring (ALIGNPIPE_THREADS=auto): 1 unless asked, 1 on one core, a busy machine
or beside sibling stage processes, 2 only when the probe shows they pay; the trainer stages (pretrain, sft,
reward, dpo) record their choice in the manifest, and the probe and 2 threads leave their figures unchanged."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from alignpipe import thread_choice
from alignpipe.cli import main
from alignpipe.errors import RunError
from conftest import TINY_EVAL, tiny_recipe, write_yaml

REWARD = {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
          "trainer": {"max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 0,
                      "logging_steps": 1}}
TIMING = ("runtime", "per_s", "per_second", "time", "wall")  # wall-clock figures: the only ones allowed to differ


def _no_gain():
    time.sleep(0.01)  # the same time on any number of threads: 2 threads never pay


def test_one_thread_unless_asked_and_on_one_core_or_a_busy_machine(monkeypatch):
    monkeypatch.delenv(thread_choice.ENV, raising=False)
    assert thread_choice.choose(_no_gain, cores=2, busy=0.0)["threads"] == 1
    monkeypatch.setenv(thread_choice.ENV, "auto")
    one_core = thread_choice.choose(_no_gain, cores=1, busy=0.0)
    assert one_core["threads"] == 1 and "1 usable core" in one_core["why"]
    busy = thread_choice.choose(_no_gain, cores=2, busy=1.0)
    assert busy["threads"] == 1 and "busy with other processes" in busy["why"] and "probe_s_1" not in busy
    no_gain = thread_choice.choose(_no_gain, cores=2, busy=0.0)  # measured: no gain, so 1
    assert no_gain["threads"] == 1 and no_gain["probe_s_1"] > 0 and "needs" in no_gain["why"]
    assert torch.get_num_threads() == 1
    monkeypatch.setenv(thread_choice.AT_ONCE_ENV, "2")  # a parallel run's stage process: never probes
    sibling = thread_choice.choose(_no_gain, cores=2, busy=0.0)
    assert sibling["threads"] == 1 and "one of 2 stage processes" in sibling["why"] and "probe_s_1" not in sibling
    assert 0.0 <= thread_choice.busy_cores(0.05) <= os.cpu_count() + 1e-6  # a share of the machine's cores


def test_a_number_of_threads_is_taken_as_asked_and_unset_keeps_the_process_threads(monkeypatch):
    try:
        monkeypatch.setenv(thread_choice.ENV, "3")
        asked = thread_choice.choose(_no_gain, cores=1, busy=2.0)  # no probe, whatever the machine
        assert asked == {"threads": 3, "why": "ALIGNPIPE_THREADS=3"} and torch.get_num_threads() == 3
        monkeypatch.delenv(thread_choice.ENV)
        torch.set_num_threads(2)  # what OMP_NUM_THREADS=2 gives the CLI's process
        kept = thread_choice.choose(_no_gain, cores=2, busy=0.0)
        assert kept["threads"] == 2 and "OMP_NUM_THREADS" in kept["why"] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    thread_choice.check_env()  # unset: fine
    for bad in ("two", "0", "-1", ""):
        monkeypatch.setenv(thread_choice.ENV, bad)
        with pytest.raises(RunError, match="ALIGNPIPE_THREADS=.* is neither auto nor a number.*fix: set it to auto"):
            thread_choice.check_env()


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


def test_the_watchdog_goes_back_to_one_thread_when_steps_slow_down():
    choice = {"threads": 2, "why": "auto: probe", "probe_s_2": 1e-9}  # any real step is far slower than this
    dog = thread_choice.watchdog(choice, steps_per_check=3)
    state = type("State", (), {"global_step": 0})()
    torch.set_num_threads(2)
    try:
        for step in range(1, 6):
            state.global_step = step
            dog.on_step_end(None, state, None)
        assert torch.get_num_threads() == 1
        assert choice["threads_fell_back_at_step"] == 4 and "back to 1 thread at step 4" in choice["why"]
    finally:
        torch.set_num_threads(1)


class _Machine:
    """A fake clock and CPU counters: this process keeps one core busy, the others `others` cores."""

    def __init__(self) -> None:
        self.t = self.machine = self.own = 0.0
        self.state = type("State", (), {"global_step": 0})()

    def drive(self, callback, windows: list[tuple[float, float]], steps: int) -> None:
        """Windows of `steps` steps, each (seconds per step, cores busy with other processes)."""
        if self.state.global_step == 0:
            callback.on_step_end(None, self.state, None)  # the first step end starts the first window
        for per_step, others in windows:
            for _ in range(steps):
                self.t, self.own, self.machine = self.t + per_step, self.own + per_step, self.machine + per_step * (1 + others)
                self.state.global_step += 1
                callback.on_step_end(None, self.state, None)


@pytest.mark.parametrize("gain", [1.6, 1.05])
def test_a_stage_beside_busy_siblings_raises_to_two_threads_once_they_end_if_that_pays(gain):
    """dpo starts on 1 thread beside ppo; once the other processes leave the second core idle, 2 threads are timed
    on the next steps and kept only when they are GAIN_NEEDED times faster."""
    choice = {"threads": 1, "why": "auto: one of 2 stage processes running at the same time"}
    m = _Machine()
    raiser = thread_choice.raise_when_alone(choice, cores=2, steps_per_check=4, clock=lambda: m.t,
                                            cpu_seconds=lambda: (m.machine, m.own))
    try:
        m.drive(raiser, [(1.0, 1.0), (1.0, 0.9)], 4)  # the sibling still runs: stays on 1
        assert torch.get_num_threads() == 1 and choice["threads"] == 1
        m.drive(raiser, [(1.0, 0.05)], 4)  # the sibling ended: 2 threads on trial
        assert torch.get_num_threads() == 2
        m.drive(raiser, [(1.0 / gain, 0.0), (0.5, 0.0)], 4)
        if gain >= thread_choice.GAIN_NEEDED:
            assert torch.get_num_threads() == 2 and choice["threads"] == 2
            assert choice["threads_raised_at_step"] == 12 and choice["why"].endswith("so 2")
            assert choice["probe_s_2"] == pytest.approx(1.0 / gain)  # the watchdog's yardstick from then on
        else:
            assert torch.get_num_threads() == 1 and choice["threads"] == 1 and choice["why"].endswith("so 1")
        assert "at step 12 other processes used 0.05 cores: 1000 ms/step on 1 thread, then" in choice["why"]
    finally:
        torch.set_num_threads(1)


def test_only_a_stage_held_to_one_thread_by_busy_cores_waits_for_them(monkeypatch):
    monkeypatch.setattr(thread_choice, "usable_cores", lambda: 2)
    monkeypatch.setenv(thread_choice.ENV, "auto")
    assert thread_choice.waits_for_idle({"threads": 1, "why": "auto: 1.50 of 2 cores busy with other processes"})
    assert not thread_choice.waits_for_idle({"threads": 1, "why": "auto: probe", "probe_s_1": 0.1})  # measured
    monkeypatch.setenv(thread_choice.ENV, "1")
    assert not thread_choice.waits_for_idle({"threads": 1, "why": "ALIGNPIPE_THREADS=1"})  # asked for 1


def _short_recipe(tmp_path, **reward):
    """pretrain (a few steps: only the later stages are looked at), sft and reward."""
    data = tiny_recipe(tmp_path / "runs", extra_stages={"reward": {**REWARD, **reward}})
    data["stages"]["pretrain"]["trainer"]["max_steps"] = 10
    return write_yaml(tmp_path / "tiny.yaml", data)


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_sft_and_reward_on_a_busy_machine_record_one_thread_and_why(tmp_path, monkeypatch):
    monkeypatch.setenv(thread_choice.ENV, "auto")
    monkeypatch.setattr(thread_choice, "usable_cores", lambda: 2)
    monkeypatch.setattr(thread_choice, "busy_cores", lambda window_s=0.5: 1.5)  # a neighbour keeps a core busy
    recipe = _short_recipe(tmp_path)
    assert main(["run", str(recipe)]) == 0
    for stage in ("pretrain", "sft", "reward"):
        metrics = _manifest(tmp_path / "runs" / "tiny" / stage)["metrics"]
        assert metrics["torch_threads"] == 1, stage
        assert metrics["torch_threads_why"] == "auto: 1.50 of 2 cores busy with other processes", stage
    assert torch.get_num_threads() == 1


def _untimed(folder) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def test_the_probe_and_two_threads_leave_sft_and_reward_figures_unchanged(tmp_path, monkeypatch):
    """sft and reward trained after a probe on 2 threads (forced: no gain needed) give the bits, logged rows and
    metrics of the same stages on 1 thread without a probe, from the same pretrain checkpoint (the reward stage
    with LoRA: the probe runs through the peft model too)."""
    recipe = _short_recipe(tmp_path, lora={"r": 4, "alpha": 8})
    one, two = tmp_path / "runs" / "tiny", tmp_path / "two" / "tiny"
    assert main(["run", str(recipe)]) == 0  # ALIGNPIPE_THREADS unset: 1 thread, no probe
    shutil.copytree(one / "pretrain", two / "pretrain")
    monkeypatch.setenv(thread_choice.ENV, "auto")
    monkeypatch.setattr(thread_choice, "usable_cores", lambda: 2)
    monkeypatch.setattr(thread_choice, "busy_cores", lambda window_s=0.5: 0.0)
    monkeypatch.setattr(thread_choice, "GAIN_NEEDED", 0.0)  # the probe always picks 2 threads
    assert main(["run", str(recipe), "--set", f"runs_dir={tmp_path / 'two'}"]) == 0
    for stage in ("sft", "reward"):
        a, b = _manifest(one / stage)["metrics"], _manifest(two / stage)["metrics"]
        assert a["torch_threads"] == 1 and a["torch_threads_why"] == "ALIGNPIPE_THREADS unset: OMP_NUM_THREADS"
        assert b["torch_threads"] == 2 and b["torch_threads_why"].startswith("auto: probe step"), b
        rows_one, rows_two = _untimed(one / stage), _untimed(two / stage)
        assert [r.keys() for r in rows_one] == [r.keys() for r in rows_two], stage
        for r, q in zip(rows_one, rows_two):  # TRL's num_tokens, token accuracy, ... included
            for key in r:  # the entropy diagnostic is a sum over the vocabulary: its order of adding moves its last bits
                assert r[key] == (pytest.approx(q[key], rel=1e-6) if key == "entropy" else q[key]), (stage, key)
        for key in set(a) - {"torch_threads", "torch_threads_why"}:
            if not any(t in key for t in TIMING):
                assert a[key] == b[key], (stage, key)
        weights = [load_file(str(next((d / stage / "model").glob("*.safetensors")))) for d in (one, two)]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), stage
    assert torch.get_num_threads() == 1
