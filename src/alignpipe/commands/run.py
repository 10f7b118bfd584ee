"""`alignpipe run <recipe>`: run a recipe's stages (default: all, in dependency order)."""

from __future__ import annotations

import os

from alignpipe.commands.validate import load_valid, recipe_args
from alignpipe.pipeline.processes import resolve_parallel
from alignpipe.pipeline.runner import log, run_recipe, summary_table
from alignpipe.runfolder.lock import LOCK_PARENT_ENV
from alignpipe.runfolder.versions import DEFAULT_KEEP
from alignpipe.runtime.distributed import is_main_process
from alignpipe.runtime.threads import set_threads


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a recipe's stages (default: all, in dependency order)")
    recipe_args(p)
    p.add_argument("--stages", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated stages to run (their missing upstream stages are built first)")
    p.add_argument("--force", action="store_true", help="re-run the named stages even if complete")
    p.add_argument("--restart", action="store_true", help="start the named stages over instead of resuming")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, metavar="N",
                   help=f"earlier versions of a re-run stage to keep in runs/<name>/.history/ (default {DEFAULT_KEEP})")
    p.add_argument("--parallel", default="1", metavar="N|auto",
                   help="run up to N stages whose upstream stages are complete at the same time, one process "
                        "each (auto: usable cores / OMP_NUM_THREADS; default 1)")
    p.add_argument("-v", "--verbose", action="store_true", dest="verbose_run", help="as alignpipe -v")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    recipe = load_valid(args)
    set_threads()
    parallel, why = resolve_parallel(args.parallel)
    if parallel > 1:
        log(f"independent stages run up to {parallel} at a time ({why})")
    manifests = run_recipe(recipe, args.stages, force=args.force, restart=args.restart, keep=args.keep,
                           parallel=parallel, overrides=args.set)
    if is_main_process() and LOCK_PARENT_ENV not in os.environ:  # one table: not per rank, not per stage process
        print(summary_table(manifests))
    return 0
