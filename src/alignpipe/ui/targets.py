"""Compare on the page: the targets a request names, looked up among the folders `alignpipe ui` found (never
joined onto a path as given), handed to the one comparison alignpipe has (report/compare.py, the same one
`alignpipe compare` and the report's sibling section read).

    <run>                 a run: alone, its sibling stages; with other runs, the stages of one name in each
    <run>/<stage>         a stage's current version (alone: against the versions kept in its history)
    <run>/<stage>@<N>     version N of it
"""

from __future__ import annotations

import re
from pathlib import Path

from alignpipe.report.compare import build_comparison
from alignpipe.ui.runs import NotFound, RunsDir

_TARGET = re.compile(r"([^/@]+)(?:/([^/@]+)(?:@v?(\d+))?)?")


def resolve(runs: RunsDir, target: str) -> str:
    """The path report/compare.py reads for a target (NotFound for a name that is not a run or stage found)."""
    found = _TARGET.fullmatch(target)
    if found is None:
        raise NotFound(f"not a target: {target[:80]!r} (give <run>, <run>/<stage> or <run>/<stage>@<version>)")
    run, stage, version = found.groups()
    if not stage:
        return str(runs.run(run))
    folder = runs.stage(run, stage)
    return f"{folder}@{version}" if version else str(folder)


def comparison(runs: RunsDir, targets: list[str]) -> dict:
    """`build_comparison` of the targets, with the folders shown relative to the runs folder."""
    data = build_comparison([resolve(runs, t) for t in targets])
    data["targets"] = list(targets)
    root = str(runs.root.absolute())
    for entry in data["entries"]:
        for key in ("path", "run_dir"):
            entry[key] = str(Path(entry[key]).absolute()).removeprefix(root).lstrip("/") or "."
    return data
