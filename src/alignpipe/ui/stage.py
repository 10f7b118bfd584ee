"""A stage as `alignpipe ui` shows it: its manifest, its curves, its verdicts and gates, and its samples beside
its parent's. Each figure is the report's own (report/figures.py: `curve_series`, `verdicts`, `pair_outcomes`),
read from the run folder and never written.

While a stage trains, its `train_log.jsonl` is not written yet (the trainers write it at the end): the curves
come from the rows it logs to `stage.log` as it goes (runtime/progress.py `log_row`), which are the same rows.
A stage re-run beside a complete version trains in `.next/<stage>`: while that attempt runs, the page shows it.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignpipe.data.world import task_kind
from alignpipe.labelling.labellers import HUMAN
from alignpipe.labelling.queue import QUEUE_FILE
from alignpipe.pipeline.gates import recorded as recorded_gates
from alignpipe.report.figures import RunFolder, curve_series, pair_outcomes, verdicts
from alignpipe.runfolder import versions as stage_versions
from alignpipe.runfolder.files import read_jsonl
from alignpipe.ui.runs import manifest_of, progress_of, stage_node

MAX_LOG_BYTES = 32 << 20  # a stage.log read for live curves: far above what a stage logs
MAX_SAMPLES = 5000  # rows sent to the samples view (the default pipeline evaluates 512)
SHOWN_KEYS = ("stage", "kind", "status", "version", "started_at", "wall_time_s", "seed", "fingerprint", "parent",
              "base_model", "lineage", "resolved_config", "inputs", "outputs", "versions", "machine", "error",
              "git_revision", "recipe")


def shown_folder(stage_dir: Path) -> Path:
    """The folder the stage page shows: a new attempt while it runs (or when it is all there is), else the
    current version."""
    side = stage_versions.next_dir(stage_dir)
    attempt = manifest_of(side)
    if attempt is not None and (attempt.get("status") == "running" or manifest_of(stage_dir) is None):
        return side
    return stage_dir


def live_rows(log: Path) -> list[dict]:
    """The metrics rows a running stage has logged to `stage.log` (JSON objects with a step), in order."""
    try:
        if not log.is_file() or log.stat().st_size > MAX_LOG_BYTES:
            return []
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        start = line.find("{")
        if start < 0 or not line.rstrip().endswith("}"):
            continue
        try:
            row = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(row, dict) and any(k in row for k in ("step", "update", "global_step")):
            rows.append(row)
    return rows


def curves(folder: Path) -> dict:
    """The stage's curves: {"xlabel", "series": {name: [xs, ys]}, "source"}, from its train log, or while it
    trains from its stage log."""
    rows = read_jsonl(folder / "train_log.jsonl", skip_torn=True, missing_ok=True)
    source = "train_log.jsonl"
    if not rows:
        rows, source = live_rows(folder / "stage.log"), "stage.log (while it trains)"
    series, xlabel = curve_series(rows)
    return {"xlabel": xlabel, "series": {k: [xs, ys] for k, (xs, ys) in series.items()}, "source": source,
            "rows": len(rows)}


def judged(run_dir: Path, stage: str) -> dict:
    """The stage's "did it help / did it hurt" rows (each judge's win rate against its parent with its
    interval and verdict), its response health and why it is not measured independently, if so."""
    try:
        figures = verdicts(RunFolder(run_dir, score_rewards=False)) or {}
    except Exception as err:  # noqa: BLE001 - a run folder the report cannot read: the page says why
        return {"error": f"{type(err).__name__}: {err}"}
    mine = [r for r in figures.get("rows", []) if r["stage"] == stage]
    return {"rows": mine, "health": next((h for h in figures.get("health", []) if h["stage"] == stage), None),
            "unmeasured": next((u["why"] for u in figures.get("unmeasured", []) if u["stage"] == stage), None),
            "notes": [list(map(str, n)) for n in figures.get("notes", []) if len(n) > 1 and n[1] == stage]}


def is_human_label_stage(folder: Path) -> bool:
    """A label stage (its folder holds a queue) whose labeller is people: the one the labelling page serves."""
    manifest = manifest_of(folder) or {}
    return (folder / QUEUE_FILE).is_file() and (manifest.get("resolved_config") or {}).get("labeller") == HUMAN


def stage_view(run_dir: Path, stage_dir: Path, writing: bool) -> dict:
    """Everything the stage page shows."""
    folder = shown_folder(stage_dir)
    manifest = manifest_of(folder) or {}
    complete = manifest.get("status") == "complete"
    return {"node": stage_node(stage_dir, writing), "folder": str(folder), "attempt": folder != stage_dir,
            "manifest": {k: manifest[k] for k in SHOWN_KEYS if k in manifest},
            "metrics": manifest.get("metrics") or {}, "progress": progress_of(folder),
            "curves": curves(folder), "verdicts": judged(run_dir, stage_dir.name) if complete and folder == stage_dir
            else None, "gates": recorded_gates(folder), "samples": (folder / "eval_samples.jsonl").is_file(),
            "labelling": is_human_label_stage(folder) or is_human_label_stage(stage_versions.next_dir(stage_dir))}


def verifier_names(metrics: dict) -> list[str]:
    """The verifiers that judged each sample (`<name>_pass_rate` beside `<name>_total`, as the report reads)."""
    return [k[: -len("_pass_rate")] for k in sorted(metrics)
            if k.endswith("_pass_rate") and f"{k[: -len('_pass_rate')]}_total" in metrics]


def passes(value) -> bool | None:
    """A verifier's verdict on one response: a bool, or a float that passes at 0.5."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value >= 0.5
    return None


def sample_row(row: dict, verifiers: list[str]) -> dict:
    """One sample beside its parent's: the judges' say on each, whether they disagree, the filters' facts."""
    says = pair_outcomes(row) if "parent_response" in row else {}
    own = {v: passes(row.get(v)) for v in verifiers if v in row}
    return {"prompt": row.get("prompt"), "kind": task_kind(str(row.get("prompt", ""))),
            "response": row.get("response"), "ended": bool(row.get("ended", True)), "tokens": row.get("tokens"),
            "parent_response": row.get("parent_response"), "parent_ended": row.get("parent_ended"),
            "verifiers": own, "parent_verifiers": {v: passes(row.get(f"parent_{v}")) for v in verifiers
                                                   if f"parent_{v}" in row},
            "reward": row.get("reward"), "parent_reward": row.get("parent_reward"), "outcomes": says,
            "disagree": any(v > 0 for v in says.values()) and any(v < 0 for v in says.values()),
            "failed": any(v is False for v in own.values()), "cut_off": not bool(row.get("ended", True))}


def samples_view(stage_dir: Path) -> dict:
    """The stage's held-out samples, each beside its parent's sample of the same prompt, with the facts the
    filters use (judges disagree, failed, cut off, task kind)."""
    folder = shown_folder(stage_dir)
    manifest = manifest_of(folder) or {}
    rows = read_jsonl(folder / "eval_samples.jsonl", skip_torn=True, missing_ok=True)
    verifiers = verifier_names(manifest.get("metrics") or {})
    out = [sample_row(r, verifiers) for r in rows[:MAX_SAMPLES] if isinstance(r, dict)]
    return {"stage": stage_dir.name, "parent": ((manifest.get("parent") or {}).get("stage")),
            "verifiers": verifiers, "rows": out, "total": len(rows), "left_out": max(0, len(rows) - MAX_SAMPLES),
            "kinds": sorted({r["kind"] for r in out if r["kind"]})}
