"""Statistics over sampled responses, shared by the stages' evaluation and the report.

Pass rates get 95% Wilson intervals (samples treated as independent). Win rates pair the k-th sample of a
prompt from one stage with the k-th sample of the same prompt from another and get 95% intervals from a
bootstrap over prompts, which respects the correlation between samples of one prompt.
"""

from __future__ import annotations

import math
import random
from typing import Any

RESAMPLES = 1000


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def by_prompt(samples: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in samples:
        out.setdefault(row["prompt"], []).append(row)
    return out


def paired(aligned: list[dict], baseline: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    """Per prompt present in both: (aligned k-th sample, baseline k-th sample) pairs."""
    a, b = by_prompt(aligned), by_prompt(baseline)
    return {p: list(zip(a[p], b[p])) for p in a if p in b}


def outcome(x: float, y: float) -> float:
    return 1.0 if x > y else 0.0 if x < y else 0.5


def bootstrap_rate(per_prompt: dict[str, list[float]], seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Mean of per-pair outcomes (1 win, 0.5 tie, 0 loss) with a prompt-bootstrap 95% interval."""
    per_prompt = {p: rows for p, rows in per_prompt.items() if rows}
    flat = [o for rows in per_prompt.values() for o in rows]
    if not flat:
        return {"rate": None}
    rate = sum(flat) / len(flat)
    rng = random.Random(seed)
    prompts = list(per_prompt)
    boot = []
    for _ in range(resamples):
        pick = [per_prompt[prompts[rng.randrange(len(prompts))]] for _ in prompts]
        total = sum(len(r) for r in pick)
        boot.append(sum(sum(r) for r in pick) / total)
    boot.sort()
    lo, hi = boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]
    return {"rate": rate, "lo": lo, "hi": hi, "pairs": len(flat), "prompts": len(prompts),
            "wins": flat.count(1.0), "ties": flat.count(0.5), "losses": flat.count(0.0)}


def win_rate(pairs: dict[str, list[tuple[dict, dict]]], key: str, seed: int = 0,
             resamples: int = RESAMPLES) -> dict[str, Any]:
    """Share of pairs the aligned sample wins by `key` (ties half), with a prompt-bootstrap 95% interval."""
    per_prompt = {p: [outcome(float(a[key]), float(b[key])) for a, b in rows] for p, rows in pairs.items()}
    return bootstrap_rate(per_prompt, seed, resamples)


def verdict(win: dict) -> str:
    """better / worse when the 95% interval of a win rate excludes 50%, else no clear difference."""
    if win.get("rate") is None:
        return "-"
    if win["lo"] > 0.5:
        return "better"
    if win["hi"] < 0.5:
        return "worse"
    return "no clear difference"


def change(mine: dict[str, list[float]], theirs: dict[str, list[float]], seed: int = 0,
           resamples: int = RESAMPLES) -> dict[str, Any]:
    """Mean of `mine` minus mean of `theirs` (per-answer values, e.g. 1.0 refused), on the prompts both have, with
    a 95% interval from a bootstrap over those prompts (each side's answers of a prompt resampled together)."""
    prompts = [p for p in mine if mine[p] and theirs.get(p)]
    if not prompts:
        return {"change": None}

    def diff(pick: list[str]) -> float:
        a = [v for p in pick for v in mine[p]]
        b = [v for p in pick for v in theirs[p]]
        return sum(a) / len(a) - sum(b) / len(b)

    rng = random.Random(seed)
    boot = sorted(diff([prompts[rng.randrange(len(prompts))] for _ in prompts]) for _ in range(resamples))
    return {"change": diff(prompts), "lo": boot[int(0.025 * resamples)], "hi": boot[int(0.975 * resamples) - 1],
            "prompts": len(prompts)}
