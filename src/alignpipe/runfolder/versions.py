"""Versions of a stage folder: a re-run trains beside the current version and replaces it only when complete.

    runs/<recipe>/<stage>/                  the current version (what other stages and commands load)
    runs/<recipe>/.next/<stage>/            a new attempt while it trains; resumable, never loaded by others
    runs/<recipe>/.history/<stage>/<N>/     earlier versions, each with its manifest (`--keep N`, default 1)

Each manifest records its `version` (1, 2, ...). When the new attempt is complete it is swapped with the
current folder in one `renameat2(RENAME_EXCHANGE)` where the file system has it (Linux), else by two
renames; a kill between any two steps is finished by `settle` on the next run, so the stage path always
holds a complete version or, for the instant between two plain renames, a complete `.next/<stage>`.
References between stages (a LoRA stage's base) are stage names plus manifest hashes, found in the
current folder or in the history, so a run folder can be moved or copied anywhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.runfolder.manifests import MANIFEST, manifest_hash, read_manifest

NEXT = ".next"
HISTORY = ".history"
DEFAULT_KEEP = 1
# errors of the storage under a run folder (full, read-only, not ours): one line, not a traceback
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


# --- where things are ---------------------------------------------------------------------------


def next_dir(stage_dir: Path) -> Path:
    stage_dir = Path(stage_dir)
    return stage_dir.parent / NEXT / stage_dir.name


def history_root(stage_dir: Path) -> Path:
    stage_dir = Path(stage_dir)
    return stage_dir.parent / HISTORY / stage_dir.name


def run_root_of(stage_dir: Path) -> Path:
    """The run folder a stage folder belongs to, wherever it is: current, a new attempt, or in history."""
    stage_dir = Path(stage_dir).absolute()
    if stage_dir.parent.name == NEXT:
        return stage_dir.parent.parent
    if stage_dir.parent.parent.name == HISTORY:
        return stage_dir.parent.parent.parent
    return stage_dir.parent


def version_of(manifest: dict | None) -> int:
    return int((manifest or {}).get("version") or 1)  # folders from before versions count as version 1


def history(stage_dir: Path) -> list[tuple[int, Path, dict]]:
    """(version, folder, manifest) of each earlier version of a stage, newest first."""
    root = history_root(stage_dir)
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        if not d.name.isdigit():  # e.g. a folder kept aside for its unreadable manifest
            continue
        try:
            manifest = read_manifest(d)
        except RunError:  # damaged: never restored, reused or pruned
            continue
        if manifest is not None:
            found.append((int(d.name), d, manifest))
    return sorted(found, key=lambda row: -row[0])


def set_aside_unreadable(stage_dir: Path) -> list[tuple[Path, str]]:
    """A stage folder (or its new attempt, `.next/<stage>`) whose manifest cannot be used (torn, damaged,
    edited) may still hold a complete model: move it whole into the history as `unreadable-<n>` (never restored
    or pruned automatically) instead of deleting it, so the stage is built again beside it. Returns (where each
    went, why), empty when both were fine."""
    from alignpipe.runfolder.manifests import manifest_problem

    stage_dir = Path(stage_dir)
    moved = []
    for folder in (stage_dir, next_dir(stage_dir)):
        problem = manifest_problem(folder) if folder.is_dir() else None
        if problem is None:
            continue
        root = history_root(stage_dir)
        root.mkdir(parents=True, exist_ok=True)
        n = 1
        while (root / f"unreadable-{n}").exists():
            n += 1
        os.rename(folder, root / f"unreadable-{n}")
        _fsync_dir(root)
        moved.append((root / f"unreadable-{n}", problem))
    return moved


def new_version(stage_dir: Path) -> int:
    """The version number a new attempt gets: one above every complete version the stage has had."""
    current = read_manifest(stage_dir)
    seen = [v for v, _, _ in history(stage_dir)]
    if current and current.get("status") == "complete":
        seen.append(version_of(current))
    return max(seen, default=0) + 1


# --- what a run of a stage does -----------------------------------------------------------------


def plan(stage_dir: Path, fingerprint: str, force: bool, restart: bool,
         same: Callable[[dict], bool] | None = None) -> tuple[str, Path]:
    """What running a stage means now, and in which folder:

    ("skip", stage)       the current version is complete with this fingerprint
    ("reuse", history/N)  an earlier complete version has this fingerprint: bring it back, no training
    ("resume", folder)    an interrupted run with this fingerprint: continue it
    ("fresh", folder)     train from step 0 in `folder` (which the caller empties first)

    A complete current version is never the folder a run trains in: that is `.next/<stage>`. `same(manifest)`
    says whether a manifest was made with this fingerprint (default: the recorded fingerprint equals it).
    """
    same = same or (lambda manifest: manifest.get("fingerprint") == fingerprint)
    stage_dir = Path(stage_dir)
    current = read_manifest(stage_dir)
    complete = bool(current) and current.get("status") == "complete"
    if not complete:  # nothing good to protect: train in place, as a first run does
        resumable = bool(current) and same(current)
        return ("resume" if resumable and not (force or restart) else "fresh"), stage_dir
    side = next_dir(stage_dir)
    attempt = read_manifest(side)
    attempt_same = bool(attempt) and same(attempt)
    if same(current) and not force:
        if attempt_same:  # a --force run of this same config was interrupted: finish it
            return ("fresh" if restart else "resume"), side
        return "skip", stage_dir
    if not force:
        for _, folder, manifest in history(stage_dir):
            if manifest.get("status") == "complete" and same(manifest):
                return "reuse", folder
    return ("resume" if attempt_same and not (force or restart) else "fresh"), side


def unfinished_attempt(stage_dir: Path) -> dict | None:
    """The manifest of a new attempt that is not complete (interrupted, failed), if there is one."""
    manifest = read_manifest(next_dir(stage_dir))
    return manifest if manifest and manifest.get("status") != "complete" else None


def settle(stage_dir: Path, keep: int = DEFAULT_KEEP) -> str | None:
    """Finish a swap that a kill cut short. Returns what it did (for the log), or None."""
    stage_dir = Path(stage_dir)
    side = next_dir(stage_dir)
    attempt = read_manifest(side)
    if not attempt or attempt.get("status") != "complete":
        return None
    current = read_manifest(stage_dir)
    if current is None and not stage_dir.exists():  # killed between the two plain renames
        os.rename(side, stage_dir)
        return f"finished swapping in version {version_of(attempt)}"
    if current is None or current.get("status") != "complete" or version_of(attempt) > version_of(current):
        promote(side, stage_dir, keep)
        return f"swapped in the completed new version {version_of(attempt)}"
    # the exchange happened; moving the old version into the history did not
    _into_history(side, stage_dir, version_of(attempt))
    prune(stage_dir, keep)
    return f"moved version {version_of(attempt)} into the history"


def promote(attempt: Path, stage_dir: Path, keep: int = DEFAULT_KEEP) -> None:
    """Make the complete `attempt` folder the stage's current version; the previous one goes to history."""
    attempt, stage_dir = Path(attempt), Path(stage_dir)
    current = read_manifest(stage_dir)
    if current is None or current.get("status") != "complete":  # nothing worth keeping at the stage path
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        os.rename(attempt, stage_dir)
    else:
        if not _exchange(attempt, stage_dir):
            target = _history_slot(stage_dir, version_of(current))
            os.rename(stage_dir, target)
            os.rename(attempt, stage_dir)
        else:
            _into_history(attempt, stage_dir, version_of(current))  # `attempt` now holds the old version
    _fsync_dir(stage_dir.parent)
    try:
        attempt.parent.rmdir()  # `.next/` once no other stage has an attempt in it
    except OSError:
        pass
    prune(stage_dir, keep)


def restore(stage_dir: Path, version: int) -> int:
    """Bring history version `version` back as the current one; the current goes to history.
    Returns the version that was current."""
    stage_dir = Path(stage_dir)
    folder = history_root(stage_dir) / str(version)
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("status") != "complete":
        have = ", ".join(str(v) for v, _, m in history(stage_dir) if m.get("status") == "complete") or "none"
        raise RunError(f"stage {stage_dir.name!r} has no complete version {version} in its history "
                       f"(versions kept: {have})", where=str(history_root(stage_dir)),
                       fix="give one of the versions `alignpipe show` lists for this stage")
    current = read_manifest(stage_dir)
    if current is None or current.get("status") != "complete":
        if stage_dir.exists():
            raise RunError(f"the stage's current folder is not complete (status {(current or {}).get('status')!r})",
                           where=str(stage_dir), fix="move it away first, or let the stage finish")
        os.rename(folder, stage_dir)
        return 0
    if not _exchange(folder, stage_dir):
        side = folder.with_name(f".{version}.restoring")
        os.rename(folder, side)
        os.rename(stage_dir, folder.with_name(str(version_of(current))))
        os.rename(side, stage_dir)
    else:  # the history slot now holds the version that was current: give it its own number
        os.rename(folder, folder.with_name(str(version_of(current))))
    _fsync_dir(stage_dir.parent)
    return version_of(current)


def discard(stage_dir: Path) -> dict | None:
    """Delete the stage's unfinished new attempt; returns its manifest (None: there was none)."""
    side = next_dir(stage_dir)
    if not side.exists():
        return None
    manifest = read_manifest(side) or {}
    shutil.rmtree(side)
    return manifest


def prune(stage_dir: Path, keep: int) -> list[int]:
    """Delete history versions beyond the newest `keep`, except a version that a current stage of the
    run folder stands on (its LoRA base). Returns the versions deleted."""
    needed = {ref.get("manifest_sha256") for ref in _lora_bases(run_root_of(stage_dir), Path(stage_dir).name)}
    deleted = []
    for i, (version, folder, _) in enumerate(history(stage_dir)):
        if i >= max(keep, 0) and manifest_hash(folder) not in needed:
            shutil.rmtree(folder)
            deleted.append(version)
    return deleted


# --- references between stages ------------------------------------------------------------------


def find_version(run_root: Path, stage: str, sha256: str | None) -> Path:
    """The folder of `stage` whose manifest hashes to `sha256`: the current one, or one in its history."""
    current = Path(run_root) / stage
    if not current.exists() and not history_root(current).exists():
        raise RunError(f"this run folder has no stage {stage!r}, which a stage in it was trained on",
                       where=str(current), fix="copy or move the whole run folder (runs/<recipe>), not single stages")
    if sha256 is None:
        return current
    for folder in [current, *(f for _, f, _ in history(current))]:
        if (folder / MANIFEST).is_file() and manifest_hash(folder) == sha256:
            return folder
    raise RunError(f"the version of stage {stage!r} this stage was trained on (manifest sha256 {sha256[:12]}) "
                   f"is neither the current one nor in its history", where=str(current),
                   fix=f"restore that version (alignpipe restore {current} VERSION), or re-run this stage")


def base_of(stage_dir: Path) -> Path | str | None:
    """What a stage's weights were trained on: a stage folder (current or in history), or the recipe's
    model path as written. Folders written before relative references: an absolute `stage_dir`, used
    when it still exists, else looked up by its name in this stage's run folder."""
    ref = (read_manifest(stage_dir) or {}).get("base_model") or {}
    if ref.get("stage"):
        return find_version(run_root_of(stage_dir), ref["stage"], ref.get("manifest_sha256"))
    if ref.get("stage_dir"):
        old = Path(ref["stage_dir"])
        return old if (old / MANIFEST).is_file() else run_root_of(stage_dir) / old.name
    return ref.get("path")


def _lora_bases(run_root: Path, stage: str) -> list[dict]:
    """The base references to `stage` of the current stages of a run folder (and their new attempts)."""
    refs = []
    for parent in (run_root, run_root / NEXT):
        for d in parent.iterdir() if parent.is_dir() else []:
            ref = (read_manifest(d) or {}).get("base_model") or {}
            if ref.get("stage") == stage:
                refs.append(ref)
    return refs


# --- renames ------------------------------------------------------------------------------------


def _history_slot(stage_dir: Path, version: int) -> Path:
    target = history_root(stage_dir) / str(version)
    if target.exists():
        raise RunError(f"history version {version} of stage {Path(stage_dir).name!r} already exists",
                       where=str(target), fix="move that folder away (it is an earlier copy of this version)")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _into_history(folder: Path, stage_dir: Path, version: int) -> None:
    os.rename(folder, _history_slot(stage_dir, version))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the system or
    file system cannot (the caller then uses two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def storage_error(err: BaseException, stage: str, attempt: Path, stage_dir: Path) -> RunError | None:
    """A RunError (one line) for a write the storage refused (disk full, read-only, no permission)."""
    if not isinstance(err, OSError) or err.errno not in STORAGE_ERRORS:
        return None
    kept = (f"the current version {stage_dir} is untouched; " if Path(attempt) != Path(stage_dir)
            and (Path(stage_dir) / MANIFEST).is_file() else "")
    return RunError(f"stage {stage!r} could not write its folder: {err.strerror or err}"
                    f"{f' ({err.filename})' if err.filename else ''}; {kept}nothing was marked complete",
                    where=str(attempt), fix="free space or make the folder writable, then run the same command "
                    "again (it resumes from the last checkpoint)")


def describe_versions(stage_dir: Path) -> list[str]:
    """Lines for `alignpipe show`: the stage's earlier versions and an unfinished new attempt."""
    lines = []
    for version, folder, manifest in history(stage_dir):
        figures = ", ".join(f"{k} {v:.3f}" for k, v in (manifest.get("metrics") or {}).items()
                            if k in ("judge_pass_rate", "eval_loss", "perplexity", "pairwise_accuracy")
                            and isinstance(v, (int, float)))
        lines.append(f"history: version {version} [{manifest.get('status')}] started {manifest.get('started_at', '?')}"
                     f"{f'; {figures}' if figures else ''} -> alignpipe restore {stage_dir} {version}")
    root = history_root(stage_dir)
    for folder in sorted(root.glob("unreadable-*")) if root.is_dir() else []:
        lines.append(f"kept aside: {folder} (its manifest could not be used; repair it and move the folder back "
                     "by hand, or delete it)")
    side = next_dir(stage_dir)
    if (attempt := read_manifest(side)) is not None:
        lines.append(f"new attempt: version {version_of(attempt)} [{attempt.get('status')}] in {side} "
                     f"-> re-run to resume it, or alignpipe discard {stage_dir}")
    return lines
