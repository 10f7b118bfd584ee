"""What the console shows while a stage runs: one progress bar per long step, the stage's log in its folder.

On a terminal a step draws one bar, redrawn in place: `label  [#####.....]  120/600  41.2 it/s  ETA 0:11`.
When the output is not a terminal (CI, a file) it prints one line per `ALIGNPIPE_PROGRESS_EVERY` percent
(default 10) instead, so a log holds ~10 lines per step, not thousands of carriage returns.

Per-step metrics (the trainers' logged rows, PPO's per-update rows) and library warnings go to the
stage's `stage.log`, not the console; `alignpipe -v run ...` (or ALIGNPIPE_VERBOSE=1) shows them too.
"""

from __future__ import annotations

# Heavy imports (transformers) stay inside the functions that use them: the CLI starts without them.
import json
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

from alignpipe.runfolder.files import write_json_atomic
from alignpipe.runtime.distributed import is_main_process

PROGRESS_FILE = "progress.json"  # the running stage's current bar, for `alignpipe ui` (read-only there)
PUBLISH_S = 1.0  # the file is rewritten at most this often (and at the end of each bar)
VERBOSE_ENV = "ALIGNPIPE_VERBOSE"
EVERY_ENV = "ALIGNPIPE_PROGRESS_EVERY"
BAR_WIDTH = 24
REDRAW_S = 0.1  # a terminal bar is redrawn at most this often (and always at the end)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _main_process() -> bool:
    return is_main_process()


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A bar for one long step of `total` items (count, rate, time left), drawn on `stream` (stderr)."""

    def __init__(self, label: str, total: int, start: int = 0, stream: IO | None = None, unit: str = "it") -> None:
        self.label, self.total, self.unit = label, max(0, int(total)), unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, min(100, int(os.environ.get(EVERY_ENV, "10") or 10)))
        self.start = self.n = int(start)  # resumed runs start past 0; the rate counts this run's items only
        self.t0 = time.monotonic()
        self._drawn_at = self._published_at = 0.0
        self._next_pct = (self.n * 100 // self.total // self.every + 1) * self.every if self.total else 100
        # one bar at a time: a step inside another (reward scoring inside a PPO update) draws nothing
        self.enabled = _main_process() and self.total > 0 and not _OPEN
        self.closed = False
        _OPEN.append(self)

    def _line(self) -> str:
        f = self.figures()
        rate, left = f["rate"], f["eta_s"]
        eta = (f"ETA {_clock(left)}" if left is not None else "ETA -") if self.n < self.total else \
            f"in {_clock(f['elapsed_s'])}"
        speed = f"- {self.unit}/s" if rate == 0 else f"{rate:.1f} {self.unit}/s" if rate >= 1 else \
            f"{1 / rate:.1f} s/{self.unit}"
        return f"{self.n}/{self.total}  {speed}  {eta}"

    def update(self, n: int = 1) -> None:
        self.set(self.n + n)

    def figures(self) -> dict:
        """The bar as numbers: count, total, rate (items/s, this run's items only), seconds elapsed and left."""
        elapsed = time.monotonic() - self.t0
        # no rate from a few milliseconds (a bar whose first item was counted as it was made)
        rate = (self.n - self.start) / elapsed if elapsed > 0.05 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else None
        return {"label": self.label, "unit": self.unit, "n": self.n, "total": self.total, "rate": round(rate, 4),
                "elapsed_s": round(elapsed, 2), "eta_s": None if left is None else round(left, 1)}

    def set(self, n: int) -> None:
        self.n = min(int(n), self.total)
        if not self.enabled or self.closed:
            return
        self._publish()
        if self.tty:
            now = time.monotonic()
            if now - self._drawn_at >= REDRAW_S or self.n >= self.total:
                self._drawn_at = now
                done = BAR_WIDTH * self.n // self.total
                bar = "#" * done + "." * (BAR_WIDTH - done)
                self.stream.write(f"\r\x1b[K{self.label}  [{bar}]  {self._line()}")
                self.stream.flush()
            return
        pct = self.n * 100 // self.total
        if pct >= self._next_pct:  # one line per `every` percent crossed, however many steps that took
            self._next_pct = (pct // self.every + 1) * self.every
            self.stream.write(f"[alignpipe] {self.label}: {pct}%  {self._line()}\n")
            self.stream.flush()

    def _publish(self) -> None:
        """The bar into the running stage's `progress.json` (at most every PUBLISH_S, always at the end), where
        `alignpipe ui` reads a stage's progress and ETA; never while no stage runs, never fatal."""
        now = time.monotonic()
        if not _STAGE_LOG or (now - self._published_at < PUBLISH_S and self.n < self.total):
            return
        self._published_at = now
        try:
            write_json_atomic(_STAGE_LOG[-1].parent / PROGRESS_FILE,
                              {**self.figures(), "pid": os.getpid(), "updated_at": time.time()},
                              durable=False)  # no fsync: ~14 ms each on a loaded disk, and nothing depends on it
        except OSError:
            pass  # a full disk stops the page's progress, not the training

    def close(self) -> None:
        if self.enabled and not self.closed and self.tty:
            self.stream.write("\n")  # keep the finished bar on screen
            self.stream.flush()
        self.closed = True
        if self in _OPEN:
            _OPEN.remove(self)


_OPEN: list[Progress] = []  # bars open now, outermost first


def track(items: Iterable, what: str, total: int | None = None, unit: str = "it", weight=None) -> Iterator:
    """`items`, with a progress bar of `total` (default `len(items)`, or the sum of `weight(item)`) counting
    them (each as `weight(item)` units when given: batches of different sizes), labelled `what` after the
    running stage's name."""
    label = f"stage {_STAGE_LOG[-1].parent.name} {what}" if _STAGE_LOG else what
    if total is None:
        total = len(items) if weight is None else sum(weight(i) for i in items)  # type: ignore[arg-type]
    bar = Progress(label, total, unit=unit)
    try:
        for item in items:
            yield item
            bar.update(1 if weight is None else weight(item))
    finally:
        bar.close()


# --- the stage's log ------------------------------------------------------------------------------

_STAGE_LOG: list[Path] = []  # the log file of the stage running now (a stack: one stage at a time)


def log_row(row: dict, prefix: str = "") -> None:
    """A per-step metrics row: to the running stage's `stage.log` (and the console with -v)."""
    line = f"{prefix}{json.dumps(row)}"
    log_line(line)


def log_line(line: str) -> None:
    if not _main_process():
        return
    if _STAGE_LOG:
        with open(_STAGE_LOG[-1], "a") as fh:
            fh.write(line + "\n")
    if verbose() or not _STAGE_LOG:
        print(line, file=sys.stderr, flush=True)


def say(line: str) -> None:
    """One of alignpipe's own lines (a warning, a finding): on the console and in the running stage's log."""
    log_line(line)
    if _main_process() and _STAGE_LOG and not verbose():
        print(line, flush=True)


@contextmanager
def stage_log(path: Path):
    """While a stage runs: its metrics rows and the libraries' warnings and log records go to `path`
    (the console too with -v); the console keeps the progress bars and alignpipe's own lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path) if _main_process() else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("transformers", "trl", "peft", "accelerate", "datasets", "mlflow",
                                                     "wandb", "py.warnings")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    logging.captureWarnings(True)
    _STAGE_LOG.append(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once, into the log
            for lg in loggers:
                lg.addHandler(handler)
                if not verbose():  # transformers' own stderr handler sits on its root logger
                    lg.propagate = False
                    for h in list(lg.handlers):
                        if h is not handler:
                            lg.removeHandler(h)
            yield
    finally:
        _STAGE_LOG.pop()
        _OPEN.clear()  # a stage that failed mid-step leaves its bar open
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
        handler.close()


def trainer_callback(label: str):
    """A transformers TrainerCallback: a bar over the training steps (resumed runs start at their step), one
    over each evaluation's batches, and the logged rows to the stage log instead of the console."""
    from transformers import TrainerCallback

    class StageProgress(TrainerCallback):
        def __init__(self) -> None:
            self.train_bar: Progress | None = None
            self.eval_bar: Progress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_bar = Progress(f"{label} train", state.max_steps, start=state.global_step, unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            if self.train_bar is not None:
                self.train_bar.set(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.train_bar is not None:
                self.train_bar.close()
                self.train_bar = None

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if self.eval_bar is None:  # (during training it stays hidden: the training bar is the one shown)
                total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") \
                    else 0
                self.eval_bar = Progress(f"{label} evaluate", total, unit="batch")
            self.eval_bar.update()

        def on_evaluate(self, args, state, control, **kwargs):
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                log_row({"step": state.global_step, **{k: v for k, v in logs.items() if k != "total_flos"}})

    return StageProgress()


def attach(trainer, label: str):
    """Swap the trainer's console printer (raw dicts every `logging_steps`) for the stage's progress bars."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not any(type(cb).__name__ == "StageProgress" for cb in trainer.callback_handler.callbacks):  # once
        trainer.add_callback(trainer_callback(label))
    return trainer
