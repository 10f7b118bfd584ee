"""Torch threads for a stage, chosen by measuring: `ALIGNPIPE_THREADS=auto` (what `make pipeline` sets).

Measured on this project's 2-core machine: the default model's pretraining step is ~1.4x faster on 2
threads when the other core is idle, and ~170x slower when a neighbour keeps it busy (shared/STACK.md).
So 2 threads are used only when a short probe says they pay now: both cores usable, other processes
using less than half a core (/proc/stat over half a second), and 2 threads faster than 1 on the stage's
own step (forward + backward on a real batch, gradients dropped, the model unchanged), timed in turn.
During training a watchdog goes back to 1 thread for good if steps become several times slower than the
probe measured (a neighbour arrived). `auto` on one core, on a busy machine, or with a probe that does not pay
is 1 thread, and so is every stage process that `alignpipe run --parallel N` runs beside
another (the parent says how many run at once in ALIGNPIPE_STAGES_AT_ONCE: two 2-thread processes on 2 cores
are the ~170x case). A trainer stage held to 1 thread that way looks again while it trains: once the other
processes leave a core idle (dpo's sibling ppo has ended), it times a few steps on 2 threads and keeps them
if they pay (`raise_when_alone`). 20 training steps on 1 and on 2 threads gave bit-identical parameters on
this machine (measured 2026-12-01). The manifest records what was chosen (`manifest_fields`).

A number (`ALIGNPIPE_THREADS=4`) is that many threads, as asked, with no probe; unset, a stage trains on the
process's own threads (OMP_NUM_THREADS; the CLI and make set 1), like the stages that do not probe.

`for_trainer` is the probe of a stage that trains with a transformers/TRL Trainer (`training.train`): the
trainer's own loss on its first batch, with the trainer's logged figures and the random state put back.
"""

from __future__ import annotations

import os
import statistics
import time

ENV = "ALIGNPIPE_THREADS"
AT_ONCE_ENV = "ALIGNPIPE_STAGES_AT_ONCE"  # set by the parent of stage processes that run at the same time
GAIN_NEEDED = 1.15  # 2 threads must be at least this much faster than 1 on the probe
SLOWDOWN_LIMIT = 3.0  # the watchdog's fallback: steps this many times slower than the probe's
PROBE_ROUNDS = 3  # each round times one step at 1 thread, then one at 2


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window_s: float = 0.5) -> float:
    """Cores kept busy by other processes now: the machine's CPU use over `window_s` while this process
    sleeps (Linux /proc/stat); elsewhere the 1-minute load average less this process."""
    try:
        busy0, total0 = _cpu_jiffies()
        time.sleep(window_s)
        busy1, total1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return max(0.0, os.getloadavg()[0] - 1.0)
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def _timed(step, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _asked(wanted: str) -> int | None:
    """The number of threads a value of ALIGNPIPE_THREADS asks for; None when it is not a number >= 1."""
    return int(wanted) if wanted.isdigit() and int(wanted) > 0 else None


def check_env() -> None:
    """RunError before anything runs when ALIGNPIPE_THREADS is neither `auto` nor a number of threads."""
    from alignpipe.errors import RunError

    wanted = os.environ.get(ENV)
    if wanted is not None and wanted != "auto" and _asked(wanted) is None:
        raise RunError(f"{ENV}={wanted!r} is neither auto nor a number of torch threads", where="the environment",
                       key=ENV, fix="set it to auto, 1, 2, ... or unset it")


def reason_for_one(cores: int | None = None, busy: float | None = None) -> str | None:
    """Why 2 threads cannot pay now, found without probing; None when only a probe can tell."""
    at_once = int(os.environ.get(AT_ONCE_ENV, "1") or 1)
    if at_once > 1:  # its siblings share the cores (and may not be busy yet when it looks)
        return f"one of {at_once} stage processes running at the same time"
    cores = usable_cores() if cores is None else cores
    if cores < 2:
        return f"{cores} usable core"
    busy = busy_cores() if busy is None else busy
    if busy > cores - 2 + 0.5:  # another process keeps a core busy: 2 threads would wait on it
        return f"{busy:.2f} of {cores} cores busy with other processes"
    return None


def choose(step, cores: int | None = None, busy: float | None = None) -> dict:
    """{threads, why, probe_s_1, probe_s_2}: the threads to train with, set in torch. `step` runs one
    probe step; `cores` and `busy` default to this machine's (given in tests)."""
    import torch

    wanted = os.environ.get(ENV)
    if wanted is None:  # the process's own threads, as every other part of the stage runs
        return {"threads": torch.get_num_threads(), "why": f"{ENV} unset: OMP_NUM_THREADS"}
    asked = _asked(wanted)
    if asked is not None:  # as asked
        torch.set_num_threads(asked)
        return {"threads": asked, "why": f"{ENV}={wanted}"}
    choice = {"threads": 1, "why": f"{ENV}={wanted}"}
    reason = reason_for_one(cores, busy) if wanted == "auto" else None
    if reason is not None:
        choice["why"] = f"auto: {reason}"
    elif wanted == "auto":
        step()  # the first step warms allocators and kernels: not timed
        one, two = [], []
        for _ in range(PROBE_ROUNDS):
            one.append(_timed(step, 1))
            two.append(_timed(step, 2))
        t1, t2 = statistics.median(one), statistics.median(two)
        choice.update(probe_s_1=round(t1, 4), probe_s_2=round(t2, 4))
        timings = f"auto: probe step {t1 * 1e3:.0f} ms on 1 thread, {t2 * 1e3:.0f} ms on 2"
        if t1 / t2 >= GAIN_NEEDED:
            choice.update(threads=2, why=timings)
        else:
            choice["why"] = f"{timings} (needs {GAIN_NEEDED}x)"
    torch.set_num_threads(choice["threads"])
    return choice


def manifest_fields(choice: dict) -> dict:
    """What a stage's manifest records of its choice."""
    return {"torch_threads": choice["threads"], "torch_threads_why": choice["why"]}


def for_trainer(trainer) -> dict:
    """`choose`, probed on the trainer's own step: its first `per_device_train_batch_size` training rows, collated
    by its collator, forward + backward through its `compute_loss`, gradients dropped (no optimiser step, so the
    model is unchanged). The trainer's running figures (TRL's per-step metrics and token count) and the random
    state (torch, Python, numpy: the sampler and dropout draw from them) are put back, so the training that
    follows logs and draws what it would have without the probe. Adds the watchdog when 2 threads are chosen."""
    import copy
    import random

    import numpy as np
    import torch

    from alignpipe.distributed import world_size

    model = trainer.model
    if next(model.parameters()).device.type != "cpu":
        return {"threads": torch.get_num_threads(), "why": "not CPU"}
    if world_size() > 1:
        torch.set_num_threads(1)
        return {"threads": 1, "why": f"{world_size()} processes train this stage"}
    dataset = trainer.train_dataset
    if hasattr(dataset, "column_names"):  # a datasets.Dataset: the columns the trainer's dataloader keeps
        dataset = trainer._remove_unused_columns(dataset, description="training")
    rows = [dataset[i] for i in range(min(trainer.args.per_device_train_batch_size, len(dataset)))]
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    figures = {k: copy.deepcopy(getattr(trainer, k)) for k in ("_metrics", "_total_train_tokens") if hasattr(trainer, k)}
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()

    def step():
        model.train()
        trainer.compute_loss(model, dict(inputs)).backward()  # a copy: compute_loss may add keys (use_cache)
        for p in model.parameters():
            p.grad = None

    try:
        choice = choose(step)
    finally:
        for k, v in figures.items():
            setattr(trainer, k, v)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
    waits = waits_for_idle(choice)
    if choice["threads"] > 1 or waits:
        trainer.add_callback(watchdog(choice))
    if waits:
        trainer.add_callback(raise_when_alone(choice, usable_cores()))
    return choice


def waits_for_idle(choice: dict) -> bool:
    """Whether a stage on 1 thread may raise to 2 later: `auto` was asked and the cores are there, but other
    processes (its siblings in a parallel run, or a neighbour) kept them busy when it started, so it did not
    probe."""
    return (os.environ.get(ENV) == "auto" and choice["threads"] == 1 and "probe_s_1" not in choice
            and usable_cores() >= 2)


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process): two readings of these give
    the CPU the other processes used in between."""
    busy, _ = _cpu_jiffies()
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def raise_when_alone(choice: dict, cores: int, steps_per_check: int = 20, clock=time.perf_counter,
                     cpu_seconds=_cpu_seconds):
    """A TrainerCallback for a stage that started on 1 thread beside busy processes (in `make pipeline`: dpo
    beside ppo). Every `steps_per_check` steps it reads how much CPU the other processes used meanwhile; once
    they leave a core idle (under half a core busy on 2), it times as many steps on 2 threads and keeps them
    when they are GAIN_NEEDED times faster than the last steps on 1 (the watchdog then guards them), else it
    goes back to 1 for good. `clock` and `cpu_seconds` are the machine's (given in tests)."""
    import torch
    from transformers import TrainerCallback

    class RaiseWhenAlone(TrainerCallback):
        def __init__(self) -> None:
            self.mark = None  # (clock, machine CPU s, own CPU s, step) at the start of the current window
            self.phase, self.per_step_1, self.others = "one", None, None  # "one" -> "trial" -> "done"

        def on_step_end(self, args, state, control, **kwargs):
            if self.phase == "done":
                return
            now = (clock(), *cpu_seconds(), state.global_step)
            if self.mark is None:
                self.mark = now
                return
            wall, n = now[0] - self.mark[0], now[3] - self.mark[3]
            if n < steps_per_check:
                return
            others = ((now[1] - self.mark[1]) - (now[2] - self.mark[2])) / max(wall, 1e-9)
            per_step, self.mark = wall / n, now
            if self.phase == "one" and others <= cores - 2 + 0.5:
                self.per_step_1, self.others, self.phase = per_step, others, "trial"
                torch.set_num_threads(2)
            elif self.phase == "trial":
                self.phase = "done"
                gain = self.per_step_1 / per_step
                tried = (f"; at step {state.global_step - n} other processes used {self.others:.2f} cores: "
                         f"{self.per_step_1 * 1e3:.0f} ms/step on 1 thread, then {per_step * 1e3:.0f} on 2")
                if gain >= GAIN_NEEDED:
                    choice.update(threads=2, probe_s_2=per_step, threads_raised_at_step=state.global_step - n,
                                  why=choice["why"] + tried + ", so 2")
                else:
                    torch.set_num_threads(1)
                    choice["why"] += tried + f" (needs {GAIN_NEEDED}x), so 1"

    return RaiseWhenAlone()


def watchdog(choice: dict, steps_per_check: int = 20):
    """A TrainerCallback that sets 1 thread for the rest of training when `steps_per_check` steps take
    SLOWDOWN_LIMIT times the probe's 2-thread step time or more; it records the step in `choice`."""
    from transformers import TrainerCallback

    class ThreadWatchdog(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.n = None, 0

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.get_num_threads() == 1 or "probe_s_2" not in choice:  # not (yet) on 2 threads for good
                return
            now = time.perf_counter()
            if self.t0 is None:
                self.t0, self.n = now, 0
                return
            self.n += 1
            if self.n < steps_per_check:
                return
            per_step = (now - self.t0) / self.n
            self.t0, self.n = now, 0
            if per_step > SLOWDOWN_LIMIT * choice["probe_s_2"]:
                torch.set_num_threads(1)
                choice.update(threads_fell_back_at_step=state.global_step,
                              why=choice["why"] + f"; back to 1 thread at step {state.global_step} "
                              f"({per_step * 1e3:.0f} ms/step)")

    return ThreadWatchdog()
