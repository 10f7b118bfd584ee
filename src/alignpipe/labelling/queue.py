"""A label stage's queue (what is to be labelled) and its label log (what was said), both in its folder.

`queue.jsonl` is written once, atomically: one item per line, two responses `a` and `b` to one prompt, already
in a seeded random order (so the page shows them as they are). `labels.jsonl` is append-only: each verdict is a
line `{"id", "verdict", "labeller", "time"}`, flushed and fsynced before it is acknowledged; an undo is a line
`{"undo": id, "labeller"}` that withdraws that item's latest verdict. Replaying the log gives the labels now, so a
closed browser or a killed server loses nothing, and a torn last line (a kill mid-write) is ignored.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from alignpipe.runfolder.files import read_jsonl, write_jsonl_atomic

QUEUE_FILE = "queue.jsonl"
LABELS_FILE = "labels.jsonl"


def write_queue(folder: Path, items: list[dict]) -> None:
    write_jsonl_atomic(Path(folder) / QUEUE_FILE, items)


def read_queue(folder: Path) -> list[dict]:
    return read_jsonl(Path(folder) / QUEUE_FILE)


def read_log(folder: Path) -> list[dict]:
    # a line torn by a kill mid-write was never acknowledged, so it is never counted
    return read_jsonl(Path(folder) / LABELS_FILE, skip_torn=True, missing_ok=True)


def current(records: list[dict], labeller: str) -> dict[str, str]:
    """item id -> the labeller's standing verdict, after its undos, in the order given."""
    history: dict[str, list[str]] = {}
    order: list[str] = []
    for r in records:
        if r.get("labeller") != labeller:
            continue
        if "undo" in r:
            stack = history.get(r["undo"], [])
            if stack:
                stack.pop()
        elif "verdict" in r:
            history.setdefault(r["id"], []).append(r["verdict"])
            order.append(r["id"])
    return {i: history[i][-1] for i in dict.fromkeys(order) if history.get(i)}


class LabelLog:
    """Appends to `labels.jsonl`, one fsynced line per call; safe across the server's threads."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LABELS_FILE
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = json.dumps({**record, "time": round(time.time(), 3)}) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def extend(self, records: list[dict]) -> None:
        """Many records at once (an automatic labeller), fsynced once."""
        stamp = round(time.time(), 3)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps({**r, "time": stamp}) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())
