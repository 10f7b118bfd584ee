"""What every contestant process shares, whichever loop it times (alignpipe's stages in `worker.py`, the
hand-written loop in `raw_loop.py`, LLaMA-Factory in `lf_contestant.py`): its start time, its peak memory,
waiting for the GPU, and the CPU it runs on. Standard library only: LLaMA-Factory's venv imports it too."""

from __future__ import annotations

import os
import resource
import time

T_START = float(os.environ.get("BENCH_T0", time.time()))  # wall clock when the parent launched us


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync() -> None:
    """Wait for queued GPU work, so that a timestamp means the step is done (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pin(spec: dict) -> None:
    """Run on the one CPU the parent chose (`cpu` in the spec): contestants compared with each other then
    share a core, so a difference between the machine's cores is not read as a difference between them."""
    if spec.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec["cpu"]})
