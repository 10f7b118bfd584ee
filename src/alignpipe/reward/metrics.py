"""How good is a reward model? Plain-Python metrics over its scalar scores.

Pairs: `margins[i] = score(chosen_i) - score(rejected_i)`. A pair is ordered correctly when its margin
is > 0 (a tie counts as wrong: a reward model that cannot tell two answers apart gives PPO nothing).
Under the Bradley-Terry model RewardTrainer fits, sigmoid(margin) is the predicted probability that
the chosen response is preferred; calibration compares that confidence with the observed accuracy.
"""

from __future__ import annotations

import math
from statistics import fmean


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def pairwise_accuracy(margins: list[float]) -> float:
    return sum(m > 0 for m in margins) / len(margins)


def calibration(margins: list[float], n_buckets: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error of sigmoid(margin), and accuracy per confidence bucket.

    Each pair is a binary prediction with confidence sigmoid(|margin|) in [0.5, 1] that is right when
    margin > 0; the buckets split [0.5, 1] evenly. ECE = sum over buckets of share * |accuracy - confidence|.
    """
    buckets: list[list[tuple[float, bool]]] = [[] for _ in range(n_buckets)]
    for m in margins:
        conf = sigmoid(abs(m))
        i = min(n_buckets - 1, int((conf - 0.5) * 2 * n_buckets))
        buckets[i].append((conf, m > 0))
    table, ece = [], 0.0
    for i, b in enumerate(buckets):
        if not b:
            continue
        conf, acc = fmean(c for c, _ in b), fmean(ok for _, ok in b)
        ece += len(b) / len(margins) * abs(acc - conf)
        table.append({"bucket": [0.5 + i / (2 * n_buckets), 0.5 + (i + 1) / (2 * n_buckets)], "count": len(b),
                      "confidence": conf, "accuracy": acc})
    return ece, table


def pearson(xs: list[float], ys: list[float], at_least: int = 1) -> float | None:
    """Pearson correlation; None when either side is constant (it is undefined then) or for fewer than
    `at_least` points."""
    if len(xs) < max(1, at_least):
        return None
    mx, my = fmean(xs), fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def auc(positive: list[float], negative: list[float]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U)."""
    if not positive or not negative:
        return None
    ranked = sorted([(s, 1) for s in positive] + [(s, 0) for s in negative])
    # average ranks over ties, then U = sum of positive ranks - n_pos (n_pos + 1) / 2
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2
        rank_sum += avg_rank * sum(label for _, label in ranked[i:j])
        i = j
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def onpolicy_pairs(prompts: list[str], passed: list[bool]) -> list[tuple[int, int]]:
    """(passing index, failing index) for every pass/fail combination of samples of the same prompt."""
    by_prompt: dict[str, tuple[list[int], list[int]]] = {}
    for i, (p, ok) in enumerate(zip(prompts, passed)):
        by_prompt.setdefault(p, ([], []))[0 if ok else 1].append(i)
    return [(g, b) for good, bad in by_prompt.values() for g in good for b in bad]


def pair_metrics(chosen: list[float], rejected: list[float], chosen_len: list[int],
                 rejected_len: list[int]) -> tuple[dict, list[dict]]:
    """Held-out preference pairs: accuracy, margin, calibration, and reward-length correlation."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    ece, table = calibration(margins)
    metrics = {
        "pairwise_accuracy": pairwise_accuracy(margins),
        "mean_margin": fmean(margins),
        "ece": ece,
        "eval_pairs": len(margins),
        # over every held-out response, chosen and rejected alike
        "reward_length_corr_pairs": pearson(chosen + rejected, [float(n) for n in chosen_len + rejected_len]),
    }
    return metrics, table


def judged_metrics(prompts: list[str], scores: list[float], passed: list[bool], lengths: list[int]) -> dict:
    """Sampled responses with the judge's verdicts: how well the reward model agrees with the judge."""
    pairs = onpolicy_pairs(prompts, passed)
    good = [s for s, ok in zip(scores, passed) if ok]
    bad = [s for s, ok in zip(scores, passed) if not ok]
    return {
        # within a prompt: what PPO feels when it compares its own samples
        "onpolicy_accuracy": (sum(scores[g] > scores[b] for g, b in pairs) / len(pairs)) if pairs else None,
        "onpolicy_pairs": len(pairs),
        "onpolicy_prompts": len({prompts[g] for g, _ in pairs}),
        # across prompts: does the score separate what the judge passes from what it fails?
        "judge_auc": auc(good, bad),
        "samples_judged": len(scores),
        "samples_passed": len(good),
        "reward_length_corr": pearson(scores, [float(n) for n in lengths]),
    }
