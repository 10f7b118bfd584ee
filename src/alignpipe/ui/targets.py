"""Compare on the page: the targets a request names (`<run>` or `<run>/<stage>`), looked up among the folders
`alignpipe ui` found, handed to the one comparison alignpipe has (report/compare.py, `alignpipe compare`)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.ui.runs import RunsDir


def resolve(runs: RunsDir, target: str) -> Path:
    """The folder a target names: a run, or one stage of a run (NotFound for anything else)."""
    run, _, stage = target.partition("/")
    return runs.stage(run, stage) if stage else runs.run(run)


def comparison(runs: RunsDir, targets: list[str]) -> dict:
    raise ValueError("compare is not available yet")
