"""The runs under a folder and each run's lineage, as `alignpipe ui` shows them: read from the run folders on
every request (a run that is going changes between two looks), never written.

A run is a folder of stage folders (`runs/<recipe>/`); RUNS_DIR may also be one run itself. Names in a request
are looked up among the folders found, never joined onto a path, so a request cannot reach outside RUNS_DIR.

A stage's node: its kind, status and version (the current folder), the headline metrics, the earlier versions
in `.history/`, a new attempt training in `.next/` and, while one trains, its `progress.json` (written by
runtime/progress.py: the bar, its rate and ETA). Stages the recipe lists that have no folder yet are `pending`.
Whether a `running` stage still runs: the run's lock file names the pid that holds it (runfolder/lock.py).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

from alignpipe.errors import RunError
from alignpipe.runfolder import versions as stage_versions
from alignpipe.runfolder.headline import HEADLINE_METRICS
from alignpipe.runfolder.lock import LOCK_NAME
from alignpipe.runfolder.manifests import MANIFEST, read_manifest, read_named_file
from alignpipe.runtime.progress import PROGRESS_FILE

MAX_SMALL_FILE = 1 << 20  # progress.json and a lock file are ~200 bytes; a bigger one is not ours


class NotFound(LookupError):
    """A run or stage name that is not one of the folders found."""


def manifest_of(folder: Path) -> dict | None:
    """A folder's manifest, None when it has none or it cannot be used (the page says so; it never fails)."""
    try:
        return read_manifest(folder)
    except RunError:
        return {"status": "unreadable manifest"} if (folder / MANIFEST).is_file() else None


def _is_stage(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (stage_versions.next_dir(folder) / MANIFEST).is_file()


def _is_run(folder: Path) -> bool:
    return any(d.is_dir() and not d.name.startswith(".") and _is_stage(d) for d in _children(folder)) or \
        (folder / stage_versions.NEXT).is_dir()


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


class RunsDir:
    """The runs under `root` (or `root` itself when it is one run), found afresh on every look."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def runs(self) -> dict[str, Path]:
        if _is_run(self.root) and not any(_is_run(d) for d in _children(self.root)):
            return {self.root.resolve().name: self.root}
        return {d.name: d for d in _children(self.root) if _is_run(d)}

    def run(self, name: str) -> Path:
        found = self.runs().get(name)
        if found is None:
            raise NotFound(f"no run {name[:80]!r} under {self.root}")
        return found

    def stage(self, run: str, stage: str) -> Path:
        """The stage's folder (which may exist only as a new attempt in `.next/`)."""
        run_dir = self.run(run)
        found = {d.name: d for d in stage_folders(run_dir)}.get(stage)
        if found is None:
            raise NotFound(f"no stage {stage[:80]!r} in run {run[:80]!r}")
        return found


def stage_folders(run_dir: Path) -> list[Path]:
    """Every stage folder of a run: current ones and those that exist so far only as a new attempt."""
    names = {d.name for d in _children(run_dir) if _is_stage(d)}
    names |= {d.name for d in _children(run_dir / stage_versions.NEXT) if (d / MANIFEST).is_file()}
    return [run_dir / n for n in sorted(names)]


def _small_text(path: Path) -> str | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_SMALL_FILE:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process: it exists
    return True


def run_writer(run_dir: Path) -> dict | None:
    """Who is writing the run now: the lock file's holder, when it names a pid on this machine that is alive.
    (Another machine's run cannot be checked from here: it counts as writing while its lock file exists.)"""
    text = _small_text(Path(run_dir) / LOCK_NAME)
    if not text:
        return None
    parts = text.split()
    try:
        pid, host = int(parts[1]), parts[3]
    except (IndexError, ValueError):
        return {"holder": text.strip()[:120]}
    if host == socket.gethostname() and not _alive(pid):
        return None
    return {"holder": text.strip()[:120], "pid": pid}


def progress_of(folder: Path) -> dict | None:
    """The running stage's current bar (`progress.json`), with how long ago it was written."""
    text = _small_text(Path(folder) / PROGRESS_FILE)
    try:
        data = json.loads(text) if text else None
    except ValueError:  # written atomically, so only a foreign file is not JSON
        return None
    if not isinstance(data, dict):
        return None
    updated = data.get("updated_at")
    age = round(time.time() - updated, 1) if isinstance(updated, (int, float)) else None
    return {k: data.get(k) for k in ("label", "unit", "n", "total", "rate", "elapsed_s", "eta_s")} | {"age_s": age}


def headline(metrics: dict) -> dict:
    """The headline metrics a stage has, in the project's order (runfolder/headline.py)."""
    return {k: metrics[k] for k in HEADLINE_METRICS
            if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)}


def _attempt(folder: Path, manifest: dict | None, writing: bool) -> dict | None:
    """A folder's state as the page shows it: status (a `running` one whose run is not being written any more
    is `stopped`), version, times, progress while running."""
    if manifest is None:
        return None
    status = str(manifest.get("status", "?"))
    if status == "running" and not writing:
        status = "stopped"
    return {"status": status, "version": stage_versions.version_of(manifest),
            "started_at": manifest.get("started_at"), "wall_time_s": manifest.get("wall_time_s"),
            "progress": progress_of(folder) if status == "running" else None}


def stage_node(stage_dir: Path, writing: bool) -> dict:
    """One stage of the lineage graph."""
    current = manifest_of(stage_dir)
    side = stage_versions.next_dir(stage_dir)
    attempt = _attempt(side, manifest_of(side), writing)
    shown = current or manifest_of(side) or {}
    parent = (shown.get("parent") or {}).get("stage") if isinstance(shown.get("parent"), dict) else None
    history = [{"version": v, "status": m.get("status"), "started_at": m.get("started_at"),
                "headline": headline(m.get("metrics") or {})} for v, _, m in stage_versions.history(stage_dir)]
    return {"stage": stage_dir.name, "kind": shown.get("kind", "?"), "parent": parent,
            "lineage": list(shown.get("lineage") or []), **(_attempt(stage_dir, current, writing) or {"status": "new"}),
            "headline": headline((current or {}).get("metrics") or {}), "history": history, "attempt": attempt}


def recipe_stages(manifests: list[dict]) -> dict[str, str | None]:
    """{stage: the stage it starts from} of the recipe the first of `manifests` with a readable recipe names."""
    for m in manifests:
        text = read_named_file(m.get("recipe") or "")  # bounded: a manifest may name /dev/zero
        try:
            stages = (yaml.safe_load(text) or {}).get("stages") if text else None
        except (yaml.YAMLError, AttributeError, RecursionError):
            continue
        if isinstance(stages, dict):
            return {str(k): (str(v["from"]) if isinstance(v, dict) and v.get("from") else None)
                    for k, v in stages.items()}
    return {}


def run_view(name: str, run_dir: Path) -> dict:
    """A run: its stages (in the recipe's order, then any others), pending ones included, and who writes it."""
    writer = run_writer(run_dir)
    folders = stage_folders(run_dir)
    nodes = [stage_node(d, writer is not None) for d in folders]
    manifests = [m for d in folders for m in (manifest_of(stage_versions.next_dir(d)), manifest_of(d)) if m]
    # the newest stage names the recipe as it is now (a stage added since the first ones ran)
    order = recipe_stages(sorted(manifests, key=lambda m: str(m.get("started_at") or ""), reverse=True))
    have = {n["stage"] for n in nodes}
    for stage, parent in order.items():
        if stage not in have:
            nodes.append({"stage": stage, "kind": "?", "parent": parent, "lineage": [], "status": "pending",
                          "headline": {}, "history": [], "attempt": None})
    rank = {s: i for i, s in enumerate(order)}
    nodes.sort(key=lambda n: (rank.get(n["stage"], len(rank)), n.get("started_at") or "", n["stage"]))
    busy = any(n["status"] == "running" or (n["attempt"] or {}).get("status") == "running" for n in nodes)
    return {"name": name, "stages": nodes, "writer": writer, "running": busy and writer is not None}


def runs_view(runs: RunsDir) -> dict:
    return {"root": str(runs.root), "runs": [run_view(name, d) for name, d in runs.runs().items()]}
