"""Paired judge-pass differences on the same held-out prompts, with 95% bootstrap intervals over prompts.

For a policy stage's `eval_samples.jsonl`: its pass rate, its parent's sampled pass rate, and its parent's greedy
answer's pass rate (`greedy_parent_judge`, one answer per prompt), each difference taken prompt by prompt (the
stage's mean over its samples of that prompt minus the other's). With a second stage: that stage's difference too.

    .venv/bin/python scripts/paired_gain.py runs/ppo-reward/ppo [runs/ppo-reward-entropy/ppo]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def per_prompt(rows: list[dict], key: str) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in rows:
        if key in r:
            by.setdefault(r["prompt"], []).append(float(r[key]))
    return {p: sum(v) / len(v) for p, v in by.items()}


def interval(diffs: list[float], seed: int = 0, draws: int = 10000) -> tuple[float, float, float]:
    rng, n = random.Random(seed), len(diffs)
    means = sorted(sum(rng.choice(diffs) for _ in range(n)) / n for _ in range(draws))
    return sum(diffs) / n, means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def show(name: str, a: dict[str, float], b: dict[str, float]) -> None:
    common = sorted(set(a) & set(b))
    mean, lo, hi = interval([a[p] - b[p] for p in common])
    print(f"{name}: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] on {len(common)} prompts")


def load(stage: str) -> list[dict]:
    return [json.loads(line) for line in open(Path(stage) / "eval_samples.jsonl")]


def main(stage: str, other: str | None = None) -> None:
    rows = load(stage)
    mine, parent, greedy = (per_prompt(rows, k) for k in ("judge", "parent_judge", "greedy_parent_judge"))
    for name, d in (("stage", mine), ("parent sampled", parent), ("parent greedy", greedy)):
        print(f"{name}: pass rate {sum(d.values()) / max(1, len(d)):.3f} ({len(d)} prompts)")
    show("stage - parent sampled", mine, parent)
    show("stage - parent greedy", mine, greedy)
    if other:
        theirs = per_prompt(load(other), "judge")
        print(f"other: pass rate {sum(theirs.values()) / len(theirs):.3f}")
        show("stage - other", mine, theirs)


if __name__ == "__main__":
    main(*sys.argv[1:3])
