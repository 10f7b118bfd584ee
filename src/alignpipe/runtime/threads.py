"""Torch threads for a trainer stage, decided from the machine and the recipe only, never from timing.

Why not from timing: matrix products and reductions sum in another order on another number of threads, so the
trained weights (and every figure after them) depend on the thread count. A count chosen by a timed probe, or
changed mid-run by a watchdog when a neighbour slows the steps, made the same recipe and seed give other
figures on a busy machine (issue 30: ppo 0.823 idle, 0.790 with a neighbour). Here a busy neighbour slows a
run down and never changes it.

`ALIGNPIPE_THREADS`:
- unset: the process's own threads (OMP_NUM_THREADS; the CLI and make set 1), as every other part of a stage;
- a number: that many threads, as asked;
- `auto` (what `make pipeline` sets): the usable cores shared among the stages that a fresh
  `alignpipe run --parallel auto` of the recipe runs at the same time as this one (its group in the recipe's
  plan, `stages_at_once`), at most AUTO_MAX_THREADS. In the default recipe on 2 cores: pretrain and sft on 2
  threads; then dpo beside reward-then-ppo (dpo needs the reward model only to score its evaluation), 1 each.
  The group comes from the recipe, not from which stages happen to run now, so `make dpo` trains dpo exactly as
  `make pipeline` does.

The manifest records the choice and why (`manifest_fields`), beside the machine facts that decide the
numerics (`runs.machine`).
"""

from __future__ import annotations

# Heavy imports (torch, datasets, transformers) stay inside the functions that use them: the CLI starts without them.
import os
import sys
from collections.abc import Callable

from alignpipe.errors import RunError
from alignpipe.runtime.distributed import world_size
from alignpipe.runtime.progress import verbose

ENV = "ALIGNPIPE_THREADS"
# At most this many threads under `auto`. Measured on this project's 2-core machine (AMD EPYC, 2026-12-07):
# the default model's pretraining step is 117 ms on 1 thread and 73 ms on 2 when the other core is idle;
# with a busy neighbour 112 ms on 1 and 232 ms on 2 (slower, never different). More threads than 2 were
# never measured to pay for models of this size; a user with a larger model sets a number.
AUTO_MAX_THREADS = 2


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _asked(wanted: str) -> int | None:
    """The number of threads a value of ALIGNPIPE_THREADS asks for; None when it is not a number >= 1."""
    return int(wanted) if wanted.isdigit() and int(wanted) > 0 else None


def check_env() -> None:
    """RunError before anything runs when ALIGNPIPE_THREADS is neither `auto` nor a number of threads."""
    wanted = os.environ.get(ENV)
    if wanted is not None and wanted != "auto" and _asked(wanted) is None:
        raise RunError(f"{ENV}={wanted!r} is neither auto nor a number of torch threads", where="the environment",
                       key=ENV, fix="set it to auto, 1, 2, ... or unset it")


def plan_lanes(pending: list[str], done: set[str], start_after: Callable[[str], list[str]],
               evaluated_with: Callable[[str], list[str]], limit: int) -> list[list[str]]:
    """The next stages to run together, as lanes: at most `limit` chains, each run in turn by one process.

    A lane opens with a stage of `pending` (taken in order) whose `start_after` stages are all done; a later
    pending stage joins the one lane that holds some of its `start_after` stages when the rest are done (ppo
    after its reward model). A stage whose `evaluated_with` stages are neither done nor in a lane leaves the
    plan, with what follows it in its lane; one in another lane is waited for before it evaluates. Every stage
    comes after its upstream stages in `pending`, so no two lanes wait for each other. The one rule of a run's
    groups (`pipeline.processes`) and of a stage's share of the cores (`stages_at_once`)."""
    lanes: list[list[str]] = []
    for name in pending:
        needs = set(start_after(name))
        homes = [lane for lane in lanes if needs & set(lane)]
        if not homes and needs <= done and len(lanes) < max(1, limit):
            lanes.append([name])
        elif len(homes) == 1 and needs <= done | set(homes[0]):
            homes[0].append(name)
    while True:  # cut each lane before its first stage whose evaluation stages are not planned (a cut may cut more)
        placed = done | {s for lane in lanes for s in lane}
        cut = [next((i for i, s in enumerate(lane) if not set(evaluated_with(s)) <= placed), len(lane))
               for lane in lanes]
        if all(i == len(lane) for i, lane in zip(cut, lanes)):
            return lanes
        lanes = [lane[:i] for i, lane in zip(cut, lanes) if i]


def next_group(pending: list[str], done: set[str], start_after: Callable[[str], list[str]],
               evaluated_with: Callable[[str], list[str]], limit: int) -> list[list[str]]:
    """`plan_lanes`, where one lane is not a group: its first stage runs alone, in the run's own process (so does
    the first pending stage when no lane is left: one whose evaluation stages a sibling process builds)."""
    lanes = plan_lanes(pending, done, start_after, evaluated_with, limit)
    return lanes if len(lanes) > 1 else [[(lanes[0] if lanes else pending)[0]]]


def stages_at_once(order: list[str], start_after: Callable[[str], list[str]],
                   evaluated_with: Callable[[str], list[str]], name: str, cores: int) -> int:
    """How many stages a fresh run of the recipe with `--parallel auto` (one 1-thread process per core) runs at
    the same time as `name`, itself included: the lanes of its group in the recipe's plan (`next_group`)."""
    pending, done = list(order), set()
    while pending:
        group = next_group(pending, done, start_after, evaluated_with, cores)
        members = {s for lane in group for s in lane}
        if name in members:
            return len(group)
        done |= members
        pending = [s for s in pending if s not in members]
    return 1


def choose(at_once: int = 1, cores: int | None = None) -> dict:
    """{threads, why}: the threads to train with, set in torch. `at_once` is the stage's group size in the
    recipe's plan (`stages_at_once`); `cores` defaults to this machine's usable cores (given in tests)."""
    import torch

    wanted = os.environ.get(ENV)
    if wanted is None:  # the process's own threads, as every other part of the stage runs
        return {"threads": torch.get_num_threads(), "why": f"{ENV} unset: OMP_NUM_THREADS"}
    asked = _asked(wanted)
    if asked is not None:
        choice = {"threads": asked, "why": f"{ENV}={wanted}"}
    else:
        cores = usable_cores() if cores is None else cores
        threads = max(1, min(AUTO_MAX_THREADS, cores // max(1, at_once)))
        choice = {"threads": threads, "why": f"auto: {cores} usable core(s) shared by {at_once} stage(s) the "
                                             f"recipe runs at once, at most {AUTO_MAX_THREADS}"}
    torch.set_num_threads(choice["threads"])
    return choice


def for_trainer(trainer, at_once: int = 1) -> dict:
    """`choose` for a stage that trains with a transformers/TRL Trainer; one thread per process when several
    processes train the stage together (DDP/FSDP), the device's own when it is not the CPU."""
    import torch

    if next(trainer.model.parameters()).device.type != "cpu":
        return {"threads": torch.get_num_threads(), "why": "not CPU"}
    if world_size() > 1:
        torch.set_num_threads(1)
        return {"threads": 1, "why": f"{world_size()} processes train this stage"}
    return choose(at_once)


def manifest_fields(choice: dict) -> dict:
    """What a stage's manifest records of its choice."""
    return {"torch_threads": choice["threads"], "torch_threads_why": choice["why"]}


def set_threads() -> None:
    """One torch thread unless told otherwise: measured here, 2 threads beside a busy neighbour core
    made a training step ~170x slower, while small models gain little from a second thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch  # heavy: a command that trains or samples imports it, `--help` and `validate` do not

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # progress bars for tokenising a few thousand rows or writing one shard are noise in a pipeline log
    import datasets  # heavy, as torch
    from transformers.utils import logging as hf_logging  # heavy, as torch

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    if not sys.stderr.isatty() and not verbose():  # TRL's own tqdm bars (DPO's reference log-probs) redraw
        os.environ.setdefault("TQDM_DISABLE", "1")  # with carriage returns: noise in a log file
