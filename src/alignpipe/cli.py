"""The `alignpipe` command. Heavy imports happen inside each command, so `--help` is instant.

Every user-facing problem is an AlignpipeError: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def set_threads() -> None:
    """One torch thread unless told otherwise: measured here, 2 threads beside a busy neighbour core
    made a training step ~170x slower, while small models gain little from a second thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # progress bars for tokenising a few thousand rows or writing one shard are noise in a pipeline log
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    from alignpipe.runtime.progress import verbose

    if not sys.stderr.isatty() and not verbose():  # TRL's own tqdm bars (DPO's reference log-probs) redraw
        os.environ.setdefault("TQDM_DISABLE", "1")  # with carriage returns: noise in a log file


def _load(args, show_data: bool = False):
    from alignpipe.recipe.schema import load_recipe
    from alignpipe.runtime.threads import check_env
    from alignpipe.pipeline.validate import validate

    check_env()
    recipe = load_recipe(args.recipe, args.set)
    validate(recipe, show_data)
    if getattr(args, "stages", None):
        unknown = [s for s in args.stages if s not in recipe.stages]
        if unknown:
            from alignpipe.errors import RecipeError

            raise RecipeError(f"no stage named {unknown[0]!r}", where=str(recipe.path), key="--stages",
                              fix=f"choose from {', '.join(recipe.stages)}")
    return recipe


def cmd_validate(args) -> int:
    recipe = _load(args, show_data=True)
    print(f"{recipe.path}: ok ({len(recipe.stages)} stages: {', '.join(recipe.order())})")
    return 0


def cmd_run(args) -> int:
    recipe = _load(args)
    set_threads()
    from alignpipe.pipeline.runner import log, run_recipe, summary_table
    from alignpipe.pipeline.processes import resolve_parallel

    parallel, why = resolve_parallel(args.parallel)
    if parallel > 1:
        log(f"independent stages run up to {parallel} at a time ({why})")
    manifests = run_recipe(recipe, args.stages, force=args.force, restart=args.restart, keep=args.keep,
                           parallel=parallel, overrides=args.set)
    from alignpipe.runtime.distributed import is_main_process

    from alignpipe.runfolder.lock import LOCK_PARENT_ENV

    if is_main_process() and LOCK_PARENT_ENV not in os.environ:  # one table: not per rank, not per stage process
        print(summary_table(manifests))
    return 0


def cmd_show(args) -> int:
    from alignpipe.runfolder import versions as stage_versions
    from alignpipe.runfolder.manifests import read_manifest

    root = Path(args.run_dir)
    dirs = [root] if (root / "manifest.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    manifests = _in_recipe_order({d.name: m for d in dirs if (m := read_manifest(d))})
    if not manifests:
        from alignpipe.errors import RunError

        raise RunError("no stage manifests found", where=str(root), fix="give runs/<recipe> or runs/<recipe>/<stage>")
    if args.json:
        print(json.dumps(manifests, indent=2))
        return 0
    from alignpipe.pipeline.runner import summary_table

    for name, m in manifests.items():
        chain = " -> ".join([*m.get("lineage", []), name])
        print(f"{name}: {m.get('kind')} [{m.get('status')}] version {stage_versions.version_of(m)} lineage: "
              f"{chain}; parent: {(m.get('parent') or {}).get('stage', m.get('base_model'))}")
        stage_dir = next(d for d in dirs if d.name == name)
        for line in stage_versions.describe_versions(stage_dir):
            print(f"  {line}")
    print(summary_table(manifests))
    return 0


def _in_recipe_order(manifests: dict[str, dict]) -> dict[str, dict]:
    """Stages in the order their recipe lists them (then any it no longer lists, oldest first)."""
    import yaml

    order: list[str] = []
    for m in manifests.values():
        try:
            order = list((yaml.safe_load(Path(m.get("recipe", "")).read_text()) or {}).get("stages") or [])
            break
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(manifests.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[1].get("started_at", ""))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignpipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every logged training row and library warning (else: in <stage>/stage.log)")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_args(p):
        p.add_argument("recipe", help="path to a recipe YAML")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set stages.sft.trainer.max_steps=10")

    p = sub.add_parser("run", help="run a recipe's stages (default: all, in dependency order)")
    recipe_args(p)
    p.add_argument("--stages", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated stages to run (their missing upstream stages are built first)")
    p.add_argument("--force", action="store_true", help="re-run the named stages even if complete")
    p.add_argument("--restart", action="store_true", help="start the named stages over instead of resuming")
    from alignpipe.runfolder.versions import DEFAULT_KEEP  # light: no torch

    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, metavar="N",
                   help=f"earlier versions of a re-run stage to keep in runs/<name>/.history/ (default {DEFAULT_KEEP})")
    p.add_argument("--parallel", default="1", metavar="N|auto",
                   help="run up to N stages whose upstream stages are complete at the same time, one process "
                        "each (auto: usable cores / OMP_NUM_THREADS; default 1)")
    p.add_argument("-v", "--verbose", action="store_true", dest="verbose_run", help="as alignpipe -v")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a recipe and its data without training")
    recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show", help="print the lineage and metrics of a run")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    from alignpipe import commands
    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from alignpipe.errors import AlignpipeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose or getattr(args, "verbose_run", False):
        from alignpipe.runtime.progress import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # processes started from here (accelerate launch) inherit it
    try:
        return args.func(args)
    except AlignpipeError as err:
        print(f"alignpipe: error: {err.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
