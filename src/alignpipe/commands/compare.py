"""`alignpipe compare A B [C ...]`: stages, versions of a stage or run folders side by side (`report.compare`):
the resolved-config keys that differ, metrics with 95% intervals, head-to-head win rates on the same held-out
prompts by each judge, and (with `--out DIR`) the training curves overlaid, one figure per quantity."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare stages, versions of a stage or run folders: config "
                                              "differences, metrics, head-to-head win rates, overlaid curves")
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="runs/<recipe>/<stage> (its current version), runs/<recipe>/<stage>@N (version N, from "
                        ".history/ too), or runs/<recipe> (a run folder). One stage alone: against its earlier "
                        "versions; one run folder alone: its sibling stages (one parent, one kind family); "
                        "several run folders: their stages of the same name")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write DIR/compare.md, DIR/compare.json and one figure per training-log quantity "
                        "(fig-compare-*.png) there")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from alignpipe.report.compare import build_comparison, render_markdown, write_figures
    from alignpipe.runfolder.files import write_atomic, write_json_atomic

    comparison = build_comparison(args.targets)
    if args.out is None:
        print(render_markdown(comparison), end="")
        return 0
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless, whatever the environment says
    out = Path(args.out)
    figures = write_figures(comparison, out)
    text = render_markdown(comparison, figures)
    write_atomic(out / "compare.md", text)
    write_json_atomic(out / "compare.json", comparison)
    print(text, end="")
    n = sum(len(f) for f in figures.values())
    print(f"\n{out / 'compare.md'}, {out / 'compare.json'} and {n} figure(s) in {out}")
    return 0
