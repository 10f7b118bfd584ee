"""Torch threads for a stage, chosen by measuring: `ALIGNPIPE_THREADS=auto` (what `make pipeline` sets).

Measured on this project's 2-core machine: the default model's pretraining step is ~1.4x faster on 2
threads when the other core is idle, and ~170x slower when a neighbour keeps it busy (shared/STACK.md).
So 2 threads are used only when a short probe says they pay now: both cores usable, other processes
using less than half a core (/proc/stat over half a second), and 2 threads faster than 1 on the stage's
own step (forward + backward on a real batch, gradients dropped, the model unchanged), timed in turn.
During training a watchdog goes back to 1 thread for good if steps become several times slower than the
probe measured (a neighbour arrived). Anything else (unset, `1`, one core, a busy machine, a probe that
does not pay) is 1 thread. 20 training steps on 1 and on 2 threads gave bit-identical parameters on this
machine (measured 2026-12-01); a whole stage was not compared. The manifest records what was chosen.
"""

from __future__ import annotations

import os
import statistics
import time

ENV = "ALIGNPIPE_THREADS"
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


def choose(step, cores: int | None = None, busy: float | None = None) -> dict:
    """{threads, why, probe_s_1, probe_s_2}: the threads to train with, set in torch. `step` runs one
    probe step; `cores` and `busy` default to this machine's (given in tests)."""
    import torch

    wanted = os.environ.get(ENV, "1")
    cores = usable_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    choice = {"threads": 1, "why": f"{ENV}={wanted}"}
    if wanted != "auto":
        pass
    elif cores < 2:
        choice["why"] = f"auto: {cores} usable core"
    elif busy > cores - 2 + 0.5:  # another process keeps a core busy: 2 threads would wait on it
        choice["why"] = f"auto: {busy:.2f} of {cores} cores busy with other processes"
    else:
        step()  # the first step warms allocators and kernels: not timed
        one, two = [], []
        for _ in range(PROBE_ROUNDS):
            one.append(_timed(step, 1))
            two.append(_timed(step, 2))
        t1, t2 = statistics.median(one), statistics.median(two)
        choice.update(probe_s_1=round(t1, 4), probe_s_2=round(t2, 4))
        if t1 / t2 >= GAIN_NEEDED:
            choice.update(threads=2, why=f"auto: probe step {t1 * 1e3:.0f} ms on 1 thread, {t2 * 1e3:.0f} ms on 2")
        else:
            choice["why"] = (f"auto: probe step {t1 * 1e3:.0f} ms on 1 thread, {t2 * 1e3:.0f} ms on 2 "
                             f"(needs {GAIN_NEEDED}x)")
    torch.set_num_threads(choice["threads"])
    return choice


def watchdog(choice: dict, steps_per_check: int = 20):
    """A TrainerCallback that sets 1 thread for the rest of training when `steps_per_check` steps take
    SLOWDOWN_LIMIT times the probe's 2-thread step time or more; it records the step in `choice`."""
    from transformers import TrainerCallback

    class ThreadWatchdog(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.n = None, 0

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.get_num_threads() == 1:
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
