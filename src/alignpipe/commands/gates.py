"""`alignpipe gates runs/<name> [--recipe RECIPE]`: re-check every stage's gates on its recorded metrics.

Nothing is trained. The gates are the ones each stage recorded (its `gates.json`), or with `--recipe`
the recipe's as they are now; the results are written back to each stage's `gates.json`. Exit 2 with
one line when a gate is missed.
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.pipeline import gates
from alignpipe.recipe.parse import load_recipe
from alignpipe.runfolder.lock import RunLock


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gates", help="re-check the gates of a run's stages on their recorded metrics")
    p.add_argument("run_dir", help="a run folder, runs/<recipe name>")
    p.add_argument("--recipe", default=None, help="take the gates from this recipe instead of the recorded ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.set_defaults(func=cmd_gates)


def cmd_gates(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RunError("no such run folder", where=str(run_dir), fix="give runs/<recipe name>")
    recipe = None
    if args.recipe:
        recipe = load_recipe(args.recipe, args.set)
        for name in recipe.stages:
            gates.check_gates(recipe, name, str(recipe.path))
    with RunLock(run_dir):
        results = gates.recheck_run(run_dir, recipe)
    for stage, rows in results.items():
        for row in rows:
            print(f"gate {'passed' if row['passed'] else 'MISSED'}: {gates.describe(stage, row)}")
    if not results:
        print(f"{run_dir}: no complete stage has gates")
    for stage, rows in results.items():
        gates.raise_if_missed(stage, rows, run_dir / stage)
    return 0
