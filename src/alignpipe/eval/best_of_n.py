"""Best-of-n, the baseline an RL stage is set beside: sample N responses per held-out prompt from a policy, let
the proxy (a reward model) pick the best of n, judge the pick with the gold; gold and proxy against n and KL.

Every n is computed from the same N = max(ns) samples, exactly rather than by drawing subsets: for one prompt
the N samples define an empirical distribution p over distinct responses; best-of-n from p (n draws with
replacement, the highest proxy score kept) has the law q(y) = (F(y) + P(y))^n - F(y)^n shared among the
responses of equal score in proportion to p, where F is the mass of lower-scored responses and P the mass of
the score's own. Gold and proxy at n are their means under q.

The KL is estimated from the samples, not from a formula in n: the plug-in estimator KL(q || p) = sum q log(q/p)
on each prompt's empirical distribution, averaged over prompts (95% interval: a bootstrap over prompts). The
closed form log n - (n - 1)/n (Beirami et al. 2024) bounds the KL of best-of-n for any base distribution, the
empirical one included, and equals it only for continuous ones: it is printed beside the estimate. With few
repeated responses per prompt the plug-in estimate is capped near log N, so it reads low at n close to N.
"""

from __future__ import annotations

import math
import random

DEFAULT_NS = (1, 2, 4, 8, 16, 32)
RESAMPLES = 1000


def closed_form(n: int) -> float:
    """log n - (n - 1)/n: the analytical best-of-n KL (an upper bound)."""
    return math.log(n) - (n - 1) / n


def bon_law(samples: list[dict], n: int) -> list[tuple[dict, float, float]]:
    """(one sample of each distinct response, its empirical probability p, its best-of-n probability q) for
    one prompt's samples (each a dict with `response` and `proxy`)."""
    distinct: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for s in samples:
        distinct.setdefault(s["response"], s)
        counts[s["response"]] = counts.get(s["response"], 0) + 1
    total = len(samples)
    by_score: dict[float, list[str]] = {}
    for text, s in distinct.items():
        by_score.setdefault(float(s["proxy"]), []).append(text)
    out, below = [], 0.0
    for score in sorted(by_score):
        group = by_score[score]
        mass = sum(counts[t] for t in group) / total
        q_group = (below + mass) ** n - below ** n
        for t in group:
            p = counts[t] / total
            out.append((distinct[t], p, q_group * p / mass))
        below += mass
    return out


def per_prompt_figures(samples: list[dict], n: int, gold: str) -> dict[str, float]:
    """KL(q || p), gold and proxy under best-of-n for one prompt's samples."""
    law = bon_law(samples, n)
    return {"kl": sum(q * math.log(q / p) for _, p, q in law if q > 0),
            "gold": sum(q * float(s[gold]) for s, _, q in law),
            "proxy": sum(q * float(s["proxy"]) for s, _, q in law)}


def _interval(values: list[float], seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    boot = sorted(sum(values[rng.randrange(len(values))] for _ in values) / len(values) for _ in range(RESAMPLES))
    return boot[int(0.025 * RESAMPLES)], boot[int(0.975 * RESAMPLES) - 1]


def curve(by_prompt: dict[str, list[dict]], ns: list[int], gold: str, seed: int = 0) -> list[dict]:
    """One row per n: KL estimate with its interval, the closed form, gold and proxy with intervals."""
    rows = []
    for n in ns:
        figures = [per_prompt_figures(s, n, gold) for s in by_prompt.values() if s]
        row: dict = {"n": n, "kl_closed_form": closed_form(n), "kl_estimator": "plug-in (empirical distribution)",
                     "prompts": len(figures)}
        for key in ("kl", "gold", "proxy"):
            values = [f[key] for f in figures]
            row[key] = sum(values) / len(values)
            row[f"{key}_ci"] = list(_interval(values, seed))
        row["sqrt_kl"] = math.sqrt(max(row["kl"], 0.0))
        row["kl_within_bound"] = row["kl_ci"][0] <= row["kl_closed_form"]
        rows.append(row)
    return rows


def at_kl(rows: list[dict], kl: float) -> dict | None:
    """The best-of-n row whose estimated KL is nearest `kl` (what an RL stage is set beside)."""
    return min(rows, key=lambda r: abs(r["kl"] - kl)) if rows else None
