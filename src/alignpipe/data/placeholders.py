"""Template placeholders left in data: `{{name}}`, `{{ author }}` (LLaMA-Factory's identity.json ships with them,
to be filled in before training). They are counted and shown with their first rows, never dropped: a row may
mean one (a template in a code answer)."""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
FIRST_ROWS = 5


def _texts(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)


def placeholders(rows: list[dict], row_numbers: list[int]) -> dict | None:
    """{count: rows holding a placeholder, names: the placeholders seen, first_rows}, or None when no row has one."""
    names, first, count = set(), [], 0
    for row, number in zip(rows, row_numbers):
        found = {m.group(0) for text in _texts(row) for m in PLACEHOLDER.finditer(text)}
        if found:
            count += 1
            names |= found
            if len(first) < FIRST_ROWS:
                first.append(number)
    return {"count": count, "names": sorted(names), "first_rows": first} if count else None
