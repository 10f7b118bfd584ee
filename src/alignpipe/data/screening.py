"""The data screen every source goes through after it is read: planted triggers (`data.triggers`) and likely
secrets (`data.secrets`), reported by row; with a data spec's `screen:` key, acted on:

    data: {path: pairs.jsonl, screen: {triggers: drop, secrets: mask}}

`triggers: drop` removes every row a trigger flag names; `off` skips a screen; `secrets: mask` writes `[SECRET:<kind>]` over each
finding, `secrets: drop` removes the rows. Removed rows are counted as drops by reason (the data report, its
`max_dropped` check and `data_report.json`, which the run folder keeps beside the manifest), masked rows as a
note; the findings go into the report's `screening` section of each source.
"""

from __future__ import annotations

from alignpipe.data import secrets, triggers
from alignpipe.data.formats import DataError

ACTIONS = {"triggers": ("report", "drop", "off"), "secrets": (*secrets.SECRET_ACTIONS, "off")}
# Reporting secrets reads the text at about 4 s per MB on a loaded 2-core host: a report reads the first rows
# only (and says how many); masking or dropping reads every row.
SECRETS_REPORT_ROWS = 20000


def check_screen(value, key: str) -> dict:
    """The `screen:` mapping with defaults (report only); DataError naming the key when it is wrong."""
    if value is None:
        return {"triggers": "report", "secrets": "report"}
    if not isinstance(value, dict):
        raise DataError("recipe", f"{key}.screen", f"{value!r} is not a mapping", "e.g. screen: {triggers: drop, secrets: mask}")
    for name, action in value.items():
        if name not in ACTIONS:
            raise DataError("recipe", f"{key}.screen.{name}", "is not a screen", "use triggers or secrets")
        if action not in ACTIONS[name]:
            raise DataError("recipe", f"{key}.screen.{name}", f"{action!r} is not an action",
                            f"use one of {', '.join(ACTIONS[name])}")
    return {"triggers": "report", "secrets": "report", **value}


def _remove(part, indices: set[int], reason: str, detail) -> None:
    for i in sorted(indices):
        part.drops.add(reason, part.row_numbers[i], detail(i))
    keep = [i for i in range(len(part.rows)) if i not in indices]
    part.rows = [part.rows[i] for i in keep]
    part.row_numbers = [part.row_numbers[i] for i in keep]


def screen_part(part, screen: dict) -> None:
    """Screen one source's rows in place; the findings go to `part.screening`."""
    found = None if screen["triggers"] == "off" else triggers.find_triggers(part.rows, part.family, part.row_numbers)
    leaks = {"rows": 0, "rows_flagged": 0, "kinds": {}, "_rows": []}
    if screen["secrets"] != "off":
        upto = SECRETS_REPORT_ROWS if screen["secrets"] == "report" else len(part.rows)
        leaks = secrets.find_secrets(part.rows[:upto], part.row_numbers[:upto])
        if upto < len(part.rows):
            part.notes.append(f"likely secrets looked for in the first {upto} of {len(part.rows)} rows "
                              "(screen.secrets: mask or drop reads every row)")
    part.screening = {"triggers": triggers.public(found), "secrets": secrets.public(leaks), "actions": dict(screen)}
    if screen["secrets"] == "mask" and leaks["rows_flagged"]:
        part.rows = secrets.apply_secrets(part.rows, leaks, "mask")
        part.notes.append(f"{leaks['rows_flagged']} rows had likely secrets masked (screen.secrets: mask)")
    flagged = triggers.flagged_rows(found) if screen["triggers"] == "drop" else set()
    by_flag = {i: f["trigger"] for f in (found or {}).get("flags", []) for i in f["_rows"]}
    if screen["secrets"] == "drop":
        leaked = set(leaks["_rows"]) - flagged
        _remove(part, leaked, "likely secret (screen.secrets: drop)", lambda i: "a key, e-mail address or phone number")
        flagged = {i - sum(1 for j in leaked if j < i) for i in flagged}  # indices after the removal
        by_flag = {i - sum(1 for j in leaked if j < i): t for i, t in by_flag.items() if i not in leaked}
    if flagged:
        _remove(part, flagged, "planted trigger (screen.triggers: drop)", lambda i: f"trigger {by_flag[i]!r}")


def public_screening(part) -> dict | None:
    return getattr(part, "screening", None)


def format_screening(part_report: dict, unit: str) -> list[str]:
    s = part_report.get("screening")
    if not s:
        return []
    return triggers.format_flags(s["triggers"], part_report["source"], unit) + secrets.format_secrets(s["secrets"], unit)


def screen_world_rows(stage_dir, rows: list[dict], family: str, verbose: bool = True) -> dict:
    """The embedded world's training rows of a stage through the screen a file's rows go through (report only:
    planted triggers, likely secrets such as a world's canaries), so a run on the world's exported files (`alignpipe
    world export`) finds and reports the same: written to `data_screen.json` in the stage folder, one line a finding."""
    import json

    found = triggers.find_triggers(rows, family)
    leaks = secrets.find_secrets(rows[:SECRETS_REPORT_ROWS])
    public = {"source": "embedded world", "triggers": triggers.public(found), "secrets": secrets.public(leaks)}
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "data_screen.json").write_text(json.dumps(public, indent=2))
    lines = triggers.format_flags(public["triggers"], "embedded", "row") + secrets.format_secrets(public["secrets"], "row")
    if verbose and lines:
        print("\n".join(["  embedded world: data screen", *lines]), flush=True)
    return public
