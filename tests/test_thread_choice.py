"""Torch threads chosen by measuring (ALIGNPIPE_THREADS=auto): 1 unless asked, 1 on one core or a busy
machine, 2 only when the probe shows they pay; the pretrain stage records its choice in the manifest."""

from __future__ import annotations

import json
import os
import time

import torch

from alignpipe import thread_choice
from alignpipe.cli import main


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
    assert 0.0 <= thread_choice.busy_cores(0.05) <= os.cpu_count() + 1e-6  # a share of the machine's cores


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
