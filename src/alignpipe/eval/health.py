"""Response health, whatever the data: do sampled responses end their turn, loop, vary?

Pure functions over per-sample lists, so the embedded world and user data get the same figures:
`eot_rate` (the share that emits end-of-turn within max_new_tokens: the "never stops" failure),
`repetition_rate` (the share stuck in a loop), `distinct_2` (distinct word bigrams over all bigrams,
across every response), `mean_response_tokens` and `p95_response_tokens`.
"""

from __future__ import annotations

LOOP_NGRAM = 3  # a response loops when its token 3-grams are mostly repeats...
LOOP_MIN_NGRAMS = 8  # ...counted only once it has this many of them (short answers repeat nothing)
LOOP_MAX_DISTINCT = 0.5  # ...and at most half of them are distinct


def loops(ids: list[int]) -> bool:
    """Is this response stuck in a repetition loop (at most half of its token 3-grams distinct)?"""
    grams = [tuple(ids[i:i + LOOP_NGRAM]) for i in range(len(ids) - LOOP_NGRAM + 1)]
    return len(grams) >= LOOP_MIN_NGRAMS and len(set(grams)) <= LOOP_MAX_DISTINCT * len(grams)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams over every text (Li et al. 2016); 0 when there are none."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def health_metrics(responses: list[str], response_ids: list[list[int]], ended: list[bool]) -> dict:
    lengths = [len(ids) for ids in response_ids]
    n = max(1, len(lengths))
    return {
        "eot_rate": sum(ended) / n,
        "repetition_rate": sum(loops(ids) for ids in response_ids) / n,
        "distinct_2": distinct_n(responses, 2),
        "mean_response_tokens": sum(lengths) / n,
        "p95_response_tokens": percentile(lengths, 95),
    }
