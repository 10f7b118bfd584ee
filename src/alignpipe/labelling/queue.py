"""A label stage's queue (what is to be labelled) and its label log (what was said), both in its folder.

`queue.jsonl` is written once, atomically: one item per line, two responses `a` and `b` to one prompt, already
in a seeded random order (so the page shows them as they are). `labels.jsonl` is append-only: each verdict is a
line `{"id", "verdict", "labeller", "time"}`, flushed and fsynced before it is acknowledged; an undo is a line
`{"undo": id, "of": vid, "labeller", "client"}` that withdraws one verdict (the page's verdicts carry a random
`vid` and the `client` page that sent them; an undo without `of`, as older logs have, withdraws the item's latest
verdict). Replaying the log gives the labels now, so a closed browser or a killed server loses nothing; a torn
last line (a kill mid-write) is ignored, and the next append starts a line of its own rather than joining it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.runfolder.files import read_jsonl, write_jsonl_atomic
from alignpipe.runfolder.manifests import read_manifest
from alignpipe.runfolder.versions import next_dir

QUEUE_FILE = "queue.jsonl"
LABELS_FILE = "labels.jsonl"


def queue_folder(stage_dir: Path) -> Path:
    """The folder whose queue is labelled: the stage folder, or its new attempt (`.next/<stage>`) while a re-run
    of a complete stage waits for labels."""
    side = next_dir(stage_dir)
    if (side / QUEUE_FILE).is_file() and (read_manifest(side) or {}).get("status") != "complete":
        return side
    if (stage_dir / QUEUE_FILE).is_file():
        return stage_dir
    raise RunError("no labelling queue here", where=str(stage_dir),
                   fix="give a label stage's folder, after `alignpipe run` has started that stage")


def write_queue(folder: Path, items: list[dict]) -> None:
    write_jsonl_atomic(Path(folder) / QUEUE_FILE, items)


def read_queue(folder: Path) -> list[dict]:
    """The queued items; a line that is not an item (`id`, `prompt`, `a`, `b` strings) is one line naming it."""
    from alignpipe.errors import RunError

    path = Path(folder) / QUEUE_FILE
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            item = None
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("id", "prompt", "a", "b"))):
            raise RunError("not a queued pair (a JSON object with string id, prompt, a and b)", where=f"{path}:{number}",
                           fix="re-run the label stage to write its queue again (alignpipe run RECIPE --stages "
                               f"{Path(folder).name} --force)")
        items.append(item)
    return items


def read_log(folder: Path) -> list[dict]:
    # a line torn by a kill mid-write was never acknowledged, so it is never counted
    return read_jsonl(Path(folder) / LABELS_FILE, skip_torn=True, missing_ok=True)


def current(records: list[dict], labeller: str) -> dict[str, str]:
    """item id -> the labeller's standing verdict, after its undos, in the order given."""
    history: dict[str, list[tuple[str | None, str]]] = {}  # item -> its (vid, verdict)s still standing
    order: list[str] = []
    for r in records:
        if not isinstance(r, dict) or r.get("labeller") != labeller:
            continue
        if "undo" in r:
            stack = history.get(str(r["undo"]), [])
            history[str(r["undo"])] = [e for e in stack if e[0] != r["of"]] if r.get("of") else stack[:-1]
        elif "verdict" in r and "id" in r:
            history.setdefault(str(r["id"]), []).append((r.get("vid"), r["verdict"]))
            order.append(str(r["id"]))
    return {i: history[i][-1][1] for i in dict.fromkeys(order) if history.get(i)}


def latest_own_verdict(records: list[dict], labeller: str, client: str) -> dict | None:
    """The latest verdict line of `client` (one page) that no undo has withdrawn yet, or None."""
    undone = {r.get("of") for r in records if isinstance(r, dict) and "undo" in r and r.get("of")}
    for r in reversed(records):
        if (isinstance(r, dict) and "verdict" in r and r.get("labeller") == labeller and r.get("client") == client
                and r.get("vid") and r["vid"] not in undone):
            return r
    return None


class LabelLog:
    """Appends to `labels.jsonl`, one fsynced line per call; safe across the server's threads."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LABELS_FILE
        self.lock = threading.RLock()  # held by a caller that reads the log and then appends (undo)

    def append(self, record: dict) -> None:
        self._write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def extend(self, records: list[dict]) -> None:
        """Many records at once (an automatic labeller), fsynced once."""
        stamp = round(time.time(), 3)
        self._write("".join(json.dumps({**r, "time": stamp}) + "\n" for r in records))

    def _write(self, text: str) -> None:
        """Append `text`, on a line of its own: after a torn last line (a kill mid-write, never acknowledged)
        a newline first, so the torn line stays alone and unreadable instead of swallowing this one."""
        with self.lock, open(self.path, "ab") as fh:
            if fh.tell() > 0 and not _ends_with_newline(self.path):
                text = "\n" + text
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
