"""Run folders and their manifests: the explicit handoff between stages.

`runs/<recipe>/<stage>/` holds `model/` (the checkpoint), `manifest.json`, `logs/` and eval samples.
The manifest says what produced the folder (resolved config, parent, input fingerprints, versions,
seed) and what it measured. `status: complete` is written last, atomically, so a killed stage never
looks complete. A stage is skipped when its folder is complete with the same fingerprint.
"""

from __future__ import annotations

# Heavy imports (torch) stay inside the functions that use them: the CLI starts without them.
import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from alignpipe import __version__
from alignpipe.errors import RunError
from alignpipe.runfolder.files import write_json_atomic

MANIFEST = "manifest.json"
# Run folders written by a different manifest schema cannot be trusted as parents.
MANIFEST_SCHEMA = 1


MAX_MANIFEST_BYTES = 32 << 20  # far above any manifest alignpipe writes; a bigger one is not one of them
# the fields that commands read, and the types alignpipe writes them with (None allowed where it writes None)
MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "kind": (str,), "status": (str,), "version": (int,), "schema": (int,), "recipe": (str,),
    "resolved_config": (dict,), "recipe_settings": (dict,), "parent": (dict, type(None)),
    "base_model": (dict, str, type(None)), "fingerprint": (str,), "inputs": (dict,), "outputs": (dict,),
    "seed": (int,), "versions": (dict,), "trust_remote_code": (bool,), "lineage": (list,), "metrics": (dict,),
    "started_at": (str,), "wall_time_s": (int, float), "error": (str,), "template_check": (dict, type(None)),
}


def manifest_problem(stage_dir: Path) -> str | None:
    """Why `stage_dir/manifest.json` exists but cannot be used (unreadable, not a JSON object, a field of the
    wrong type), or None: it is fine, or there is none."""
    try:
        read_manifest(stage_dir)
    except RunError as err:
        return err.what
    return None


def read_manifest(stage_dir: Path) -> dict | None:
    """The manifest of a stage folder, None when it has none; a RunError (one line) when it cannot be used:
    it never reads more than MAX_MANIFEST_BYTES, and never hands on a field of a type alignpipe does not write."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError) as err:  # a torn or damaged file; UnicodeDecodeError too
        reason = err.msg if isinstance(err, json.JSONDecodeError) else (str(err).splitlines() or [""])[0][:120]
        raise _unusable(path, f"it cannot be read as JSON ({type(err).__name__}: {reason})") from None
    if not isinstance(data, dict):
        raise _unusable(path, f"it holds a JSON {type(data).__name__}, not an object")
    for key, types in MANIFEST_TYPES.items():
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # bool is an int
            raise _unusable(path, f"field {key!r} is a {type(value).__name__}, alignpipe writes a "
                                  f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")
    return data


def read_named_file(path: str | Path, limit: int = 4 << 20) -> str | None:
    """The text of a file a manifest names (its recipe, its model's config), or None when that is not a
    regular file of at most `limit` bytes: a run folder can name /dev/zero or a 50 GB file."""
    try:
        path = Path(path)
        if not path.is_file() or path.stat().st_size > limit:
            return None
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
        return raw.decode("utf-8") if len(raw) <= limit else None
    except (OSError, ValueError):
        return None


def _unusable(path: Path, why: str) -> RunError:
    return RunError(f"the stage's manifest cannot be used: {why}", where=str(path),
                    fix="restore it from a copy; or let `alignpipe run` move the stage folder into .history/ and "
                        "build the stage again")


def is_complete(stage_dir: Path) -> bool:
    try:
        manifest = read_manifest(stage_dir)
    except RunError:  # a torn write: not complete
        return False
    return bool(manifest) and manifest.get("status") == "complete"


def manifest_hash(stage_dir: Path) -> str:
    return sha256_bytes((Path(stage_dir) / MANIFEST).read_bytes())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def fingerprint_path(path: Path) -> str:
    """sha256 over a file, or over every file of a folder (names and bytes), skipping checkpoints."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def verified_cache(model_dir: Path) -> Path:
    """Where the stats of `model_dir`'s files are remembered after their hash matched: the user's cache folder
    (`$XDG_CACHE_HOME` or ~/.cache, `alignpipe/model-verified/`), never the run folder, which loading leaves as
    it was."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignpipe" / "model-verified"
    return root / (sha256_bytes(str(Path(model_dir).resolve()).encode()) + ".json")


def _file_stats(model_dir: Path) -> dict[str, list[int]]:
    """Size, inode, modification and change time of each file under `model_dir`; the change time cannot be set
    back by a program, so a file edited after the last check never matches its cached stats."""
    out = {}
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        st = f.stat()
        out[str(f.relative_to(model_dir))] = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    return out


def verify_model_files(stage_dir: Path, manifest: dict | None = None) -> None:
    """Refuse a stage whose `model/` files are not the ones its manifest hashed when it completed
    (`outputs.model`): a flipped byte, a truncated copy, a file swapped in. The full hash is computed once and
    remembered with the files' stats (runs.verified_cache), so later loads cost a `stat` per file.
    A manifest from before hashes were recorded (or none) is not checked. This catches damage and edits of
    model/ alone; whoever can also edit the manifest can make it match (see docs/when-things-go-wrong.md)."""
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir) if manifest is None else manifest
    expected = ((manifest or {}).get("outputs") or {}).get("model")
    model_dir = stage_dir / "model"
    if not isinstance(expected, str) or not model_dir.is_dir():
        return
    stats = _file_stats(model_dir)
    cache = verified_cache(model_dir)
    try:
        cached = json.loads(cache.read_text()) if cache.is_file() and cache.stat().st_size < (1 << 20) else {}
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and cached.get("sha256") == expected and cached.get("files") == stats:
        return
    if fingerprint_path(model_dir) != expected:
        raise RunError("the model's files do not match the hash its manifest recorded when the stage completed "
                       "(outputs.model): they were changed or damaged since", where=str(model_dir),
                       fix=f"restore them from a copy, or re-run stage {stage_dir.name!r} with --force")
    try:
        write_json_atomic(cache, {"sha256": expected, "files": stats})
    except OSError:
        pass  # no writable cache folder: checked in full each time


def versions() -> dict[str, str]:
    """Versions of everything that changes numbers."""
    out = {"alignpipe": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The facts about this machine that decide a stage's numerics besides the versions: the CPU model, the
    kernels torch picks on it (its CPU capability, which ATEN_CPU_CAPABILITY can lower), the usable cores and
    the process's torch threads (a trainer stage's own are `torch_threads` in its metrics). Two runs of one
    recipe and seed with equal machine facts and versions give bit-identical metrics; a difference in figures
    between two machines is explained here first."""
    import torch

    return {"cpu_model": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "process_torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class StageRun:
    """The manifest of one stage's run folder, written as the stage goes: running -> complete|failed."""

    def __init__(self, stage_dir: Path, base: dict[str, Any], earlier_wall_time_s: float = 0.0) -> None:
        self.dir = Path(stage_dir)
        self.data = dict(base)
        self.started = time.time()
        self.earlier = earlier_wall_time_s  # attempts this one resumes (interrupted, killed, failed)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data.update(status="running", schema=MANIFEST_SCHEMA, started_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json_atomic(self.dir / MANIFEST, self.data)

    def finish(self, metrics: dict[str, Any], status: str = "complete", **extra: Any) -> None:
        self.data.update(extra)
        self.data["metrics"] = metrics
        self.data.update(self._wall_times())
        (self.dir / "error.txt").unlink(missing_ok=True)  # an earlier attempt's, now resumed to the end
        self.data["status"] = status  # last field written; the rename below makes it atomic
        write_json_atomic(self.dir / MANIFEST, self.data)

    def fail(self, error: str, status: str = "failed") -> None:
        self.data.update(status=status, error=error, **self._wall_times())
        write_json_atomic(self.dir / MANIFEST, self.data)

    def _wall_times(self) -> dict[str, float]:
        """`wall_time_s` over every attempt of this run folder, `wall_time_this_attempt_s` for this one."""
        this = round(time.time() - self.started, 2)
        return {"wall_time_s": round(self.earlier + this, 2), "wall_time_this_attempt_s": this}


def require_complete(stage_dir: Path, needed_by: str) -> dict:
    """The manifest of a parent folder, or a RunError saying how to build it."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise RunError(f"stage {needed_by!r} needs {stage_dir}, which does not exist", where=str(stage_dir),
                       fix=f"build it first: alignpipe run RECIPE --stages {Path(stage_dir).name}")
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise RunError(f"written by an incompatible alignpipe (manifest schema {manifest.get('schema')!r}, "
                       f"this version reads {MANIFEST_SCHEMA})", where=str(stage_dir / MANIFEST),
                       fix="re-run that stage with --force, or use the alignpipe version that wrote it")
    if manifest.get("status") != "complete":
        raise RunError(f"stage {needed_by!r} needs a complete parent, but its status is "
                       f"{manifest.get('status')!r}", where=str(stage_dir / MANIFEST),
                       fix=f"re-run stage {Path(stage_dir).name!r} (it resumes or restarts)")
    return manifest
