"""The run report's view of experiments side by side (`report.compare`): sibling stages (one parent, one kind
family, e.g. `dpo_b01` and `dpo_b05` from one sft) with their config differences, metric rows and head-to-head
win rates; and each stage that has earlier versions kept in `.history/`, said with how many, that the report
shows the current one, and how the current one's config differs from the previous one's."""

from __future__ import annotations

from pathlib import Path

from alignpipe.report.compare import (fmt_value, run_stages, build_comparison, group_lines, history_summary,
                                      sibling_groups)


def _versions(n: int) -> str:
    return f"{n} earlier version{'s' if n != 1 else ''}"


def history_line(run_dir: Path, h: dict) -> str:
    changes = "; ".join(f"`{key}` {fmt_value(values[h['labels'][1]])} → {fmt_value(values[h['labels'][0]])}"
                        for key, values in h["config"]["differs"].items()) or "nothing (the same resolved config)"
    kept = ", ".join(str(v) for v in h["versions"])
    return (f"- `{h['stage']}`: this report shows its current version, {h['current']}; {_versions(len(h['versions']))} "
            f"kept in `.history/{h['stage']}/` ({kept}). Version {h['current']} differs from version "
            f"{h['previous']} in: {changes}. Compare them: `alignpipe compare {Path(run_dir) / h['stage']}`.")


def compared(run_dir: Path) -> tuple[list[str], list[tuple]]:
    """(the section's Markdown lines, notes for the report's header). Empty when the run has neither siblings nor
    earlier versions."""
    run_dir = Path(run_dir)
    stages = run_stages(run_dir)
    histories = [h for e in stages if (h := history_summary(e.stage.dir)) is not None]
    groups = sibling_groups(stages)
    if not groups and not histories:
        return [], []
    lines = ["## Sibling stages and earlier versions", ""]
    for name, members in groups:
        group = build_comparison([e.stage.dir for e in members])["groups"][0]
        lines += [f"### Siblings {name}", "",
                  *group_lines(group, None, curves_hint=f"`alignpipe compare {run_dir} --out DIR` draws them "
                                                        "overlaid"), ""]
    if histories:
        lines += ["### Earlier versions", "", *(history_line(run_dir, h) for h in histories)]
    notes = [(f"stage `{h['stage']}` is version {h['current']} of it; {_versions(len(h['versions']))} kept in "
              f"`.history/{h['stage']}/`, and this report shows only the current one (what changed: \"Earlier "
              "versions\" below).",) for h in histories]
    return lines, notes
