"""What the GPU check measures of one stage, on either side (alignpipe's `alignpipe run`, plain TRL): make bench's
probe (benchmarks/worker.py: step times, tokens by attention mask) plus each step's real tokens, so the steady
rate leaves out the first steps, and the GPU memory peak at the end of the training loop (before any
evaluation, whose sampling batches are sized to the free memory and would say nothing about training).

Real tokens are the same on both sides: every `*input_ids` tensor a training step receives, counted by its
attention mask (a padding-free batch has none, and no pad: all its tokens count). The trainers are the same
TRL classes on both sides, so their batches carry the same keys."""

from __future__ import annotations

import time

from benchmarks.worker import Probe


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def reset_gpu_peak() -> None:
    import gc

    import torch

    gc.collect()
    if gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_mib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu() else None


class StageProbe(Probe):
    """`Probe` with each step's real tokens and the memory peak of the training loop."""

    def reset(self, record: bool = False) -> None:
        super().reset(record)
        self.step_real: list[int] = []
        self.train_peak_mib: float | None = None

    def on_step_begin(self, inputs) -> None:
        before = self.real_tokens
        super().on_step_begin(inputs)
        self.step_real.append(self.real_tokens - before)

    def on_step_end(self) -> None:
        super().on_step_end()
        self.train_peak_mib = gpu_peak_mib()

    def figures(self, t_call: float, t_return: float, skip: int) -> dict:
        """One stage's figures: steps, the steady rate (real tokens and steps after the first `skip` steps),
        the time from the stage's start to its first step, and the training loop's memory peak."""
        out = {"stage_s": round(t_return - t_call, 2), "peak_gpu_train_mib": self.train_peak_mib,
               "peak_gpu_stage_mib": gpu_peak_mib()}
        if not self.ends:
            return out
        n = len(self.ends)
        k = min(skip, n - 1)
        steady_s = self.ends[-1] - self.ends[k - 1] if k > 0 else self.ends[-1] - self.begins[0]
        out.update(steps=n, time_to_first_step_s=round(self.begins[0] - t_call, 2),
                   loop_s=round(self.ends[-1] - self.begins[0], 3), steady_steps=n - k,
                   steady_s=round(steady_s, 3), steps_per_s=round((n - k) / steady_s, 3),
                   real_tokens=self.real_tokens, tokens=self.tokens,
                   real_tokens_per_s=round(sum(self.step_real[k:]) / steady_s, 1) if self.step_real else None,
                   first_loss=self.first_loss)
        return out


def timed(probe: StageProbe, call, skip: int) -> dict:
    """Run one stage (`call()`), its figures, or the error that stopped it."""
    probe.reset()
    reset_gpu_peak()
    t_call = time.perf_counter()
    try:
        call()
        status = "ok"
    except BaseException as err:  # a failed stage is a finding: recorded, and the next stage still runs
        if isinstance(err, KeyboardInterrupt):
            raise
        status = f"failed: {type(err).__name__}: {str(err)[:300]}"
    return {"status": status, **probe.figures(t_call, time.perf_counter(), skip)}
