"""Independent stages at the same time: each lane of stages in an `alignpipe run --stages <a>,<b>` process of its own.

A lane is a chain one process runs in turn (reward, then the ppo trained against it); the lanes of a group run
side by side (`threads.next_group`). A stage that needs another only to score its evaluation (dpo's reward
model) trains beside it and waits for it before evaluating (`await_stage`); each child is told which stages its
siblings build (BESIDE_ENV), so it neither builds them itself nor refuses to start without them.

The parent run holds the run folder's lock for the whole time; each child is told (ALIGNPIPE_LOCK_PARENT)
that its parent holds it, and RunLock lets a child in only while that very process holds it. Each child
checks its upstream stages' fingerprints itself (they are complete, so they are skipped) and writes only
its own stage folder. Every stage seeds itself at its start, so its figures are those of a sequential run.
A stage's torch threads do not depend on which stages run beside it now: under ALIGNPIPE_THREADS=auto
each takes its share of the cores in the recipe's plan (thread_choice.stages_at_once), so a stage run alone
(`--stages dpo`, `--parallel 1`) trains exactly as it does beside its siblings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.pipeline import gates
from alignpipe.pipeline.plan import is_up_to_date, same_result
from alignpipe.recipe.schema import Recipe
from alignpipe.runfolder import manifests as runs
from alignpipe.runfolder.lock import LOCK_PARENT_ENV
from alignpipe.runtime.threads import next_group, usable_cores
import alignpipe


def resolve_parallel(value: str | int) -> tuple[int, str]:
    """(stage processes at a time, why): `auto` = the usable cores / torch threads per process."""
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    if str(value) != "auto":
        n = int(value) if str(value).isdigit() else 0
        if n < 1:
            raise RunError(f"--parallel {value} must be at least 1", where="--parallel", fix="write 1, 2, ... or auto")
        return n, f"--parallel {n}"
    cores = usable_cores()
    return max(1, cores // threads), f"auto: {cores} usable core(s), {threads} torch thread(s) per stage"


BESIDE_ENV = "ALIGNPIPE_BESIDE"  # the stages a run's sibling processes build, for each child (comma-separated)
POLL_S = 0.5


def ready_group(recipe: Recipe, pending: list[str], done: set[str], parallel: int,
                renewed: set[str] = frozenset()) -> list[list[str]]:
    """The next lanes to run together (`threads.next_group`): at most `parallel`; one lane of one stage when
    nothing can run beside it. A lane is cut where `renewed` (the stages named with --force / --restart) starts
    or stops holding its stages: one process takes one --force for all the stages it runs."""
    lanes = next_group(pending, done, recipe.start_after, recipe.evaluated_with, parallel)
    return [lane[: next((i for i, s in enumerate(lane) if (s in renewed) != (lane[0] in renewed)), len(lane))]
            for lane in lanes]


def built_beside() -> set[str]:
    """The stages this process's siblings build (set by the parent run; empty when run alone)."""
    return {s for s in os.environ.get(BESIDE_ENV, "").split(",") if s}


def child_command(recipe: Recipe, lane: list[str], overrides: list[str], force: set[str], restart: set[str],
                  keep: int) -> list[str]:
    cmd = [sys.executable, "-m", "alignpipe.cli", "run", str(recipe.path), "--stages", ",".join(lane),
           "--keep", str(keep)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--force"] if set(lane) & force else []) + (["--restart"] if set(lane) & restart else [])


def wait_until_built(recipe: Recipe, name: str, fingerprint: str, needed_by: str, log) -> None:
    """Block until stage `name`, built by a sibling process, is complete with `fingerprint` (the parent stops
    this process when the sibling ends without it)."""
    said = False
    while True:
        try:
            manifest = runs.read_manifest(recipe.stage_dir(name)) or {}
        except RunError:  # caught mid-write
            manifest = {}
        if manifest.get("status") == "complete" and same_result(manifest, fingerprint):
            if missed_gate(recipe, name):  # as in turn: a stage built on one that missed a gate does not go on
                raise RunError(f"stage {name} missed a gate: {needed_by} is not evaluated with it",
                               where=str(recipe.stage_dir(name)), fix=f"see stage {name}'s gates above")
            return
        if not said:
            log(f"stage {needed_by}: trained; waiting for stage {name} (built beside it) to score its evaluation")
            said = True
        time.sleep(POLL_S)


def missed_gate(recipe, name: str) -> bool:
    """Whether stage `name` is complete and missed one of its gates (what its own process exited for)."""
    stage_dir = recipe.stage_dir(name)
    return (runs.read_manifest(stage_dir) or {}).get("status") == "complete" and \
        any(not r.get("passed") for r in gates.recorded(stage_dir) or [])


def run_together(recipe: Recipe, lanes: list[list[str]], overrides: list[str], force: set[str], restart: set[str],
                 keep: int, log) -> None:
    """Run each lane in a child process of its own; wait for all. A child whose stage waits for a stage of
    another lane is stopped when that lane's process ends without it. Raises GateError when only gates were
    missed (the stages are complete), else RunError naming the lanes whose process failed (each printed its
    own message above)."""
    source = str(Path(alignpipe.__file__).resolve().parents[1])  # the children run this very alignpipe
    env = {**os.environ, LOCK_PARENT_ENV: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)}
    procs = {}
    for lane in lanes:
        beside = [s for other in lanes if other is not lane for s in other]
        procs[",".join(lane)] = subprocess.Popen(child_command(recipe, lane, overrides, force, restart, keep),
                                                 env={**env, BESIDE_ENV: ",".join(beside)}, cwd=Path.cwd())
    log(f"stages {', '.join(' then '.join(lane) for lane in lanes)}: running at the same time, one process each "
        f"(pids {', '.join(str(p.pid) for p in procs.values())})")
    try:
        codes = _wait_for_lanes(recipe, procs, log)
    except BaseException:  # Ctrl-C reaches the children too (same process group); wait for them to stop
        for p in procs.values():
            p.wait()
        raise
    failed = [f"{lane} (exit {rc})" for lane, rc in codes.items() if rc != 0]
    if failed:  # only missed gates (the stages are complete): the runner stops only what is built on them
        missed_only = all(any(missed_gate(recipe, n) for n in lane.split(",") + _evaluated_with(recipe, lane))
                          for lane, rc in codes.items() if rc)
        error = gates.GateError if missed_only else RunError
        raise error(f"stage(s) {', '.join(failed)} failed in their own process; its message is above",
                    where=str(recipe.run_root), fix="fix what it says, then run the same command again "
                    "(complete stages are skipped)")


def _wait_for_lanes(recipe: Recipe, procs: dict[str, subprocess.Popen], log) -> dict[str, int]:
    """{lane: exit code} once every child has ended; a child left waiting for a stage that an ended sibling
    did not complete is stopped (SIGTERM) and named."""
    codes: dict[str, int] = {}
    while len(codes) < len(procs):
        for lane, proc in procs.items():
            if lane not in codes and proc.poll() is not None:
                codes[lane] = proc.returncode
                if proc.returncode == 0:
                    continue
                missing = {s for s in lane.split(",") if missed_gate(recipe, s) or not is_up_to_date(recipe, s)}
                for other, waiter in procs.items():
                    needs = set(_evaluated_with(recipe, other)) & missing
                    if other not in codes and needs:
                        log(f"stage(s) {other}: stopped: they are evaluated with {', '.join(sorted(needs))}, "
                            f"which did not complete (or missed a gate) in its own process")
                        waiter.terminate()
        time.sleep(POLL_S)
    return codes


def _evaluated_with(recipe: Recipe, lane: str) -> list[str]:
    """The stages a lane's stages (comma-separated) are evaluated with."""
    return [u for s in lane.split(",") for u in recipe.evaluated_with(s)]
