"""The data validation report: what was read, kept and dropped, and how long the rows are in tokens.

`validation_report` returns a JSON-able dict (the caller writes it to the run folder);
`format_report` turns it into a short summary for the screen.
"""

from __future__ import annotations

import math
import random
from typing import Any

from alignpipe.data.formats import DataError
from alignpipe.data.placeholders import placeholders
from alignpipe.data.screening import format_screening, public_screening
from alignpipe.data.sources import PreparedData


def _render(rows: list[dict], family: str, tokenizer: Any) -> list[str | list[str]]:
    """Each row as the text(s) a trainer will tokenize: the chat template applied, as TRL does."""
    if family == "text":
        return [row["text"] for row in rows]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("tokenizer", "chat_template", f"{family} rows need a chat template and it has none",
                        "set chat_template: in the recipe or use a tokenizer that has one")

    def chat(messages: list[dict], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    if family == "conversations":
        return [chat(row["messages"]) for row in rows]
    if family == "prompts":
        return [chat(row["prompt"], generation_prompt=True) for row in rows]
    if family == "pairs":  # the trainer truncates prompt+chosen and prompt+rejected alike
        return [[chat(row["prompt"] + row["chosen"]), chat(row["prompt"] + row["rejected"])] for row in rows]
    if family == "kto":
        return [chat(row["prompt"] + row["completion"]) for row in rows]
    raise ValueError(f"unknown family {family!r}")


def token_lengths(rows: list[dict], family: str, tokenizer: Any) -> list[int]:
    """Tokens per row after the chat template (for a pair, the longer of its two sequences)."""
    rendered = _render(rows, family, tokenizer)
    flat = [t for r in rendered for t in (r if isinstance(r, list) else [r])]
    # Templated text already holds its special tokens; plain text gets the tokenizer's (bos/eos) added.
    ids = tokenizer(flat, add_special_tokens=family == "text")["input_ids"]
    lengths, i = [], 0
    for r in rendered:
        width = len(r) if isinstance(r, list) else 1
        lengths.append(max(len(x) for x in ids[i : i + width]))
        i += width
    return lengths


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    return sorted_values[max(1, math.ceil(len(sorted_values) * q / 100)) - 1]


def length_stats(lengths: list[int], max_length: int | None) -> dict:
    ordered = sorted(lengths)
    stats = {
        "rows_measured": len(ordered),
        "min": ordered[0],
        "median": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }
    if max_length is not None:
        truncated = sum(1 for n in ordered if n > max_length)
        stats["max_length"] = max_length
        stats["truncated"] = truncated
        stats["truncated_fraction"] = round(truncated / len(ordered), 4)
    return stats


def validation_report(
    data: PreparedData,
    tokenizer: Any = None,
    max_length: int | None = None,
    *,
    sample: int | None = None,
    seed: int = 0,
) -> dict:
    """Counts of rows read / kept / dropped (by reason, with the first offending row numbers), and, with a
    tokenizer, the token-length distribution and how many rows `max_length` truncates.

    `sample` measures lengths on that many rows drawn with `seed` instead of all of them.
    """
    sources = [
        {
            "source": part.source,
            "format": part.format,
            "detected": part.detected,
            "row_unit": part.unit,  # what first_rows count: file lines or record indices
            "rows_read": part.rows_read,
            "rows_kept": len(part.rows),
            "rows_dropped": part.drops.total,
            "dropped": part.drops.as_dict(),
            "notes": part.notes,
            "why": part.why,
            "placeholders": placeholders(part.rows, part.row_numbers),  # `{{name}}` left in the data
            "screening": public_screening(part),  # planted triggers, likely secrets (data/screening.py)
        }
        for part in data.parts
    ]
    report = {
        "family": data.family,
        "rows_read": sum(s["rows_read"] for s in sources),
        "rows_kept": sum(s["rows_kept"] for s in sources),
        "rows_dropped": sum(s["rows_dropped"] for s in sources),
        "rows_out": len(data.rows),  # after mixing; equals rows_kept without a mixture, bar pair unpairing
        "sources": sources,
        "mixture": data.mixture,
        "tokens": None,
    }
    if tokenizer is not None:
        rows = data.rows
        if sample is not None and sample < len(rows):
            rows = random.Random(seed).sample(rows, sample)
        report["tokens"] = length_stats(token_lengths(rows, data.family, tokenizer), max_length)
        if data.family == "pairs" and max_length is not None:  # TRL's DPOTrainer drops these pairs outright
            prompts = _render([{"prompt": r["prompt"]} for r in rows], "prompts", tokenizer)  # + generation prompt
            ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            report["tokens"]["prompt_fills_max_length"] = sum(len(x) >= max_length for x in ids)
    return report


def format_report(report: dict) -> str:
    """A few lines for the screen."""
    lines = [
        f"data ({report['family']}): {report['rows_read']} rows read, {report['rows_kept']} kept, "
        f"{report['rows_dropped']} dropped, {report['rows_out']} usable"
    ]
    for s in report["sources"]:
        how = f"detected from {s['why']}" if s["detected"] and s.get("why") else "detected" if s["detected"] else "given"
        lines.append(f"  {s['source']}: {s['format']} ({how}), {s['rows_read']} read -> {s['rows_kept']} kept")
        for reason, d in s["dropped"].items():
            where = ", ".join(map(str, d["first_rows"]))
            lines.append(f"    dropped {d['count']:>5} {reason}: {d['example']} ({s['row_unit']} {where})")
        lines += [f"    note: {note}" for note in s["notes"]]
        if s.get("placeholders"):
            p = s["placeholders"]
            lines.append(f"    placeholders: {p['count']} rows hold template placeholders {', '.join(p['names'][:6])} "
                         f"({s['row_unit']} {', '.join(map(str, p['first_rows']))}): fill them in before training, unless they are meant literally (code)")
        lines += format_screening(s, s["row_unit"])
    for m in report["mixture"] or []:
        extra = " (rows repeated)" if m["upsampled"] else ""
        lines.append(f"  mixture: {m['source']} weight {m['weight']:g}: {m['taken']} of {m['available']}{extra}")
    t = report["tokens"]
    if t:
        line = (f"  tokens after the template: p50 {t['median']}, p95 {t['p95']}, max {t['max']} (min {t['min']})"
                f" over {t['rows_measured']} rows")
        if "max_length" in t:
            line += f"; {t['truncated']} ({t['truncated_fraction']:.1%}) longer than max_length {t['max_length']}"
        if t.get("prompt_fills_max_length"):
            line += (f"; {t['prompt_fills_max_length']} pairs' prompts alone fill it, and a dpo stage drops those "
                     "pairs (TRL)")
        lines.append(line)
    return "\n".join(lines)
