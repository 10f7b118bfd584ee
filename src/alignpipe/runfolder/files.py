"""The one atomic writer and the one JSONL reader of alignpipe.

Atomic: the bytes go to a temp file beside the target (`.<name>.tmp-<pid>`), are flushed and fsynced, then the
temp file is renamed over the target. A process killed at any point leaves the old file whole (or none), never a
torn one; at worst a temp file beside it.

JSONL: one JSON value a line, blank lines skipped. A line that is not JSON is an error naming the file and line,
or (`skip_torn=True`, for a log appended to while a process may be killed) a line cut off by a kill, skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alignpipe.errors import AlignpipeError


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write `text` to `path` atomically (a temp file beside it, fsynced, renamed over it). `durable=False` skips
    the fsync (a reader still sees the old file or the new one, never a torn one; a power cut may lose it): for a
    file rewritten every second that nothing depends on (a running stage's progress.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any, durable: bool = True) -> None:
    """One JSON document, indented, written atomically (values JSON does not know are written as strings)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", durable)


def write_jsonl_atomic(path: Path, rows: Iterable[Any]) -> None:
    """JSON lines, one row each, written atomically."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def parse_jsonl(lines: Iterable[str], where: str, skip_torn: bool = False) -> list[Any]:
    """The JSON values of `lines` (blank ones skipped); `where` names the file in the error."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if skip_torn:  # a line cut off by a kill mid-write: never acknowledged, so never counted
                continue
            raise AlignpipeError(f"not JSON: {err.msg}", where=f"{where}:{number}",
                                 fix="one JSON object per line") from None
    return rows


def read_jsonl(path: Path, skip_torn: bool = False, missing_ok: bool = False) -> list[Any]:
    """The JSON values of the file at `path`; `missing_ok`: [] when there is no such file."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    return parse_jsonl(path.read_text(encoding="utf-8").splitlines(), str(path), skip_torn)
