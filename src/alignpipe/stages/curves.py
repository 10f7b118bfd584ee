"""What a training stage does along training: curve points (`eval.along_training`) every `eval.every` updates,
the onset monitors (`eval.onset`) on every update, and at the end the over-optimisation assessment
(`eval.overoptimisation`) with its console line. `AlongTraining.on_update` is the trainer's hook;
`finish()` gives the manifest's figures."""

from __future__ import annotations

import time
from collections.abc import Callable

from alignpipe.eval import overoptimisation
from alignpipe.eval.along_training import CurveRecorder, read_curve, recorder
from alignpipe.eval.onset import OnsetMonitor
from alignpipe.runtime.progress import say


class AlongTraining:
    """`on_update(step, row)` after each update (step 0: before the first; row None then): a curve point when
    one is due, the monitors on the row. Only the main process measures."""

    def __init__(self, ctx, curve: CurveRecorder | None, policy: Callable[[], object], last: int):
        self.ctx, self.curve, self.policy, self.last = ctx, curve, policy, last
        self.monitor = OnsetMonitor(ctx.name)
        self.wall_s = 0.0

    def on_update(self, step: int, row: dict | None) -> None:
        if row is not None:
            self.monitor.train_row(step, row)
        if self.curve is not None and self.curve.due(step, self.last):
            started = time.perf_counter()
            point = self.curve.point(step, self.policy())
            self.wall_s += time.perf_counter() - started
            self.monitor.curve_row(point, self.curve.gold)

    def finish(self) -> dict:
        """The manifest's figures: the monitors, and with curves the assessment (said in one line)."""
        out = self.monitor.metrics() if self.monitor.watched else {}
        if self.curve is None:
            return out
        figures = overoptimisation.assess(read_curve(self.ctx.dir), self.curve.gold, self.ctx.seed)
        if (text := overoptimisation.line(self.ctx.name, figures)) is not None:
            say(text)
        return {**out, **figures, "eval_curve_wall_s": round(self.wall_s, 2)}


def along_training(ctx, tokenizer, reference, policy: Callable[[], object], last: int, main: bool = True):
    """The stage's hook object; on other processes than the main one, one that measures nothing."""
    curve = recorder(ctx, tokenizer, reference) if main else None
    return AlongTraining(ctx, curve, policy, last)


def trl_callback(ctx, tokenizer, reference: Callable[[], object], last: int):
    """A transformers TrainerCallback that records curve points every `eval.every` optimiser steps of a TRL
    stage (DPO and its family, GRPO, RLOO): at the first step of the run and then as `AlongTraining` says.
    `reference()` makes the model KL is measured against (called once, only when curves are on); the
    callback's `along` gives the manifest's figures with `along.finish()`."""
    from transformers import TrainerCallback

    from alignpipe.runtime.distributed import is_main_process

    spec = ctx.config.eval
    curve = recorder(ctx, tokenizer, reference()) if spec.enabled and spec.every > 0 and is_main_process() else None
    along = AlongTraining(ctx, curve, lambda: None, last)

    class AlongTrainingCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            along.policy = lambda: model
            along.on_update(state.global_step, None)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            along.policy = lambda: model
            if state.global_step > 0:
                along.on_update(state.global_step, None)

    callback = AlongTrainingCallback()
    callback.along = along
    return callback
