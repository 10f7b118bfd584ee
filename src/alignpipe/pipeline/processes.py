"""Independent stages at the same time: each in an `alignpipe run --stages <name>` process of its own.

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
from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.pipeline import gates
from alignpipe.recipe.schema import Recipe
from alignpipe.runfolder import manifests as runs
from alignpipe.runfolder.lock import LOCK_PARENT_ENV
from alignpipe.runtime.threads import ready_stages, usable_cores
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


def ready_group(recipe: Recipe, pending: list[str], done: set[str], parallel: int) -> list[str]:
    """The next stages to start together: those of `pending` whose upstream stages are all done, in recipe
    order, at most `parallel` of them (always at least the first ready one)."""
    return ready_stages(pending, done, recipe.upstream, parallel)


def child_command(recipe: Recipe, name: str, overrides: list[str], force: bool, restart: bool, keep: int) -> list[str]:
    cmd = [sys.executable, "-m", "alignpipe.cli", "run", str(recipe.path), "--stages", name, "--keep", str(keep)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--force"] if force else []) + (["--restart"] if restart else [])


def missed_gate(recipe, name: str) -> bool:
    """Whether stage `name` is complete and missed one of its gates (what its own process exited for)."""
    stage_dir = recipe.stage_dir(name)
    return (runs.read_manifest(stage_dir) or {}).get("status") == "complete" and \
        any(not r.get("passed") for r in gates.recorded(stage_dir) or [])


def run_together(recipe: Recipe, names: list[str], overrides: list[str], force: set[str], restart: set[str],
                 keep: int, log) -> None:
    """Run `names` (mutually independent, upstreams complete) in one child process each; wait for all.
    Raises RunError naming the stages whose process failed (each printed its own message above)."""
    source = str(Path(alignpipe.__file__).resolve().parents[1])  # the children run this very alignpipe
    env = {**os.environ, LOCK_PARENT_ENV: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)}
    procs = {}
    for name in names:
        procs[name] = subprocess.Popen(child_command(recipe, name, overrides, name in force, name in restart, keep),
                                       env=env, cwd=Path.cwd())
    log(f"stages {', '.join(names)}: running at the same time, one process each "
        f"(pids {', '.join(str(p.pid) for p in procs.values())})")
    try:
        codes = {name: p.wait() for name, p in procs.items()}
    except BaseException:  # Ctrl-C reaches the children too (same process group); wait for them to stop
        for p in procs.values():
            p.wait()
        raise
    failed = [f"{name} (exit {rc})" for name, rc in codes.items() if rc != 0]
    if failed:  # only missed gates (the stages are complete): the runner stops only what is built on them
        error = gates.GateError if all(missed_gate(recipe, n) for n, rc in codes.items() if rc != 0) else RunError
        raise error(f"stage(s) {', '.join(failed)} failed in their own process; its message is above",
                       where=str(recipe.run_root), fix="fix what it says, then run the same command again "
                       "(complete stages are skipped)")
