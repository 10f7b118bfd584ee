"""Preference pairs for a reward model: shape them as TRL's conversational pairs, drop unusable ones.

A pair is `{"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...]}`; a plain-string prompt
becomes one user message and a plain-string response one assistant message. Unusable pairs are
dropped and counted by reason, so the numbers can be reported before any training starts:

    missing_field   prompt, chosen or rejected absent, None, or not text/messages
    empty_prompt    the prompt has no text
    empty_response  chosen or rejected has no text
    identical       chosen == rejected (the pair carries no preference)
    too_long        a response alone does not fit in `max_length` tokens (RewardTrainer would drop it silently)

A pair whose prompt makes it too long is kept with its prompt cut from the left, as TRL does: whole early
turns first, then the start of the earliest turn left, so the last turns and both whole responses stay.
Those are counted as `truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignpipe.errors import AlignpipeError

REASONS = ("missing_field", "empty_prompt", "empty_response", "identical", "too_long")


@dataclass
class PairReport:
    """How many pairs were read, kept and dropped (by reason, with the first dropped row numbers)."""

    name: str
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, list[int]] = field(default_factory=dict)
    truncated: int = 0  # kept with the prompt cut from the left to fit max_length
    unit: str = "row"  # what first_rows count: file lines, or positions in the list given

    @property
    def kept(self) -> int:
        return self.read - sum(self.dropped.values())

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        rows = self.first_rows.setdefault(reason, [])
        if len(rows) < 5:
            rows.append(row)

    def summary(self) -> str:
        why = ", ".join(f"{r} x{n} (first {self.unit}s {self.first_rows[r]})" for r, n in self.dropped.items())
        cut = f", {self.truncated} with the prompt cut from the left to fit" if self.truncated else ""
        return f"{self.name} pairs: {self.read} read, {self.kept} usable{cut}, {self.read - self.kept} dropped" + \
            (f": {why}" if why else "")

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "truncated": self.truncated, "dropped": dict(self.dropped),
                "first_rows": dict(self.first_rows)}


class _Bad(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _messages(value: Any, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or \
            not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in value):
        raise _Bad("missing_field")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages).strip()


def clean_pair(row: Any) -> dict:
    """One row as a conversational pair; raises _Bad(reason) when it cannot be used."""
    if not isinstance(row, dict) or any(row.get(k) is None for k in ("prompt", "chosen", "rejected")):
        raise _Bad("missing_field")
    prompt = _messages(row["prompt"], "user")
    chosen, rejected = _messages(row["chosen"], "assistant"), _messages(row["rejected"], "assistant")
    if not _text(prompt):
        raise _Bad("empty_prompt")
    if not _text(chosen) or not _text(rejected):
        raise _Bad("empty_response")
    if chosen == rejected:
        raise _Bad("identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _length(tokenizer, prompt: list[dict], pair: dict) -> int:
    return max(len(tokenizer.apply_chat_template(prompt + pair[side], tokenize=True, return_dict=True)["input_ids"])
               for side in ("chosen", "rejected"))


def fit_prompt(pair: dict, tokenizer, max_length: int) -> dict:
    """The pair as it is when it fits; else with its prompt cut from the left (whole turns, then characters of
    the earliest turn left) until it does. Raises _Bad("too_long") when the responses alone do not fit."""
    prompt = pair["prompt"]
    if _length(tokenizer, prompt, pair) <= max_length:
        return pair
    if _length(tokenizer, [{**prompt[-1], "content": ""}], pair) > max_length:
        raise _Bad("too_long")
    while len(prompt) > 1 and _length(tokenizer, prompt, pair) > max_length:
        prompt = prompt[1:]
    if _length(tokenizer, prompt, pair) > max_length:  # one turn left: keep as much of its end as fits
        text, lo, hi = prompt[0]["content"], 0, len(prompt[0]["content"])
        while lo < hi:  # the smallest start offset that fits
            mid = (lo + hi) // 2
            if _length(tokenizer, [{**prompt[0], "content": text[mid:]}] + prompt[1:], pair) <= max_length:
                hi = mid
            else:
                lo = mid + 1
        prompt = [{**prompt[0], "content": text[lo:]}] + prompt[1:]
    return {**pair, "prompt": prompt}


def filter_pairs(rows: list, name: str, tokenizer=None, max_length: int | None = None) -> tuple[list[dict], PairReport]:
    """Usable pairs and the report of what was dropped. Raises AlignpipeError if none is usable.

    With a tokenizer and `max_length`, pairs whose prompt + chosen or prompt + rejected, rendered by the chat
    template, exceed `max_length` tokens have their prompt cut from the left (`fit_prompt`), or are dropped here,
    where they are counted, when the responses alone are too long.
    """
    report = PairReport(name, read=len(rows))
    kept = []
    # file lines when the rows know them (alignpipe.data.split.Rows), else positions in this list
    numbers = [n if n is not None else i for i, n in enumerate(getattr(rows, "numbers", [None] * len(rows)), 1)]
    report.unit = getattr(rows, "unit", "row") if hasattr(rows, "numbers") and None not in rows.numbers else "row"
    for number, row in zip(numbers, rows):
        try:
            pair = clean_pair(row)
            if tokenizer is not None and max_length is not None:
                fitted = fit_prompt(pair, tokenizer, max_length)
                report.truncated += fitted is not pair
                pair = fitted
            kept.append(pair)
        except _Bad as bad:
            report.drop(bad.reason, number)
    if not kept:
        raise AlignpipeError(f"no usable preference pairs: {report.summary()}", key="data",
                             fix="check the data: each row needs a prompt and two different, non-empty responses "
                                 "(chosen, rejected)" + (f" within {max_length} tokens" if max_length else ""))
    return kept, report
