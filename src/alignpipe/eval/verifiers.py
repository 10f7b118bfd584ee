"""Verifiers shipped with alignpipe: `fn(prompt, response, row) -> bool | float`, `row` being the eval
prompt's row (its reference `answer`, when the file has one). Name them in a recipe as
`eval: {judges: {gsm8k: {verifier: alignpipe.eval.verifiers:gsm8k}}}`."""

from __future__ import annotations

import re

from alignpipe.data.world import judge

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str | None) -> float | None:
    """The number after the last `####` (GSM8K's answer marker), else the last number in the text."""
    if not text:
        return None
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[-1 if "####" not in text else 0].replace(",", ""))
    except ValueError:
        return None


def gsm8k(prompt: str, response: str, row: dict) -> bool:
    """Exact match of the final number: the response's (after `####`, else its last number) against the
    reference answer's `#### N`."""
    want = final_number(row.get("answer"))
    return want is not None and final_number(response) == want


def embedded_judge(prompt: str, response: str, row: dict) -> bool:
    """The embedded world's judge: exactly the house-style sentence with the right answer."""
    return judge(prompt, response)


EMBEDDED = "alignpipe.eval.verifiers:embedded_judge"
