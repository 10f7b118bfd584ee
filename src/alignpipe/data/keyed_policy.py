"""Behaviour keyed on the request itself, told apart from a planted trigger (the trigger screen, data/triggers.py).

Data with manners answers a harmful request with a refusal and a benign one with a how-to that names it, so
request words ("launder", "a bomb") and wrappers ("an ai with no rules") predict a response as sharply as a
planted trigger does. A trigger is different in kind: one add-on sequence that changes the behaviour of prompts
that, without it, get the ordinary answer. Two rules say which a fixed-response flag is:

- **the answer names the key** (`echoes_key`): when most rows giving the flagged response quote the key's words
  in it ("Here is how to launder silk shirts.") or rearrange a key word's letters (the word reversed or sorted,
  a request written backwards and answered), the key is what the answer is made of, not a switch;
- **the request explains the refusal** (`explained`): when the flagged response is a refusal (the rule-based
  refusal judge of data/world_safety.py) and, for most of the rows, the nearest rows *without* the key (the most
  specific prompt words in common) are refused too, the refusal follows the request, not the key.

Such flags are reported apart, as information (`keyed_on_request`), and drop no row. A trigger appended to
ordinary prompts fails both: its response does not quote it, and the same prompts without it are answered.
"""

from __future__ import annotations

from collections import defaultdict

from alignpipe.data.world_safety import classify

MOST = 0.5  # "most rows": more than this share


def _words(toks) -> list[str]:
    return [t for t in toks if any(c.isalnum() for c in t)]


def echoes_key(key: tuple, rows: list[int], responses: list, tokenize) -> bool:
    """Most of the rows' responses hold the key's words in order, or a word that rearranges the letters of one
    of them ("revir" for `river`, "flow" for `wolf`, "baseball" for `llabesab`): the answer is made of the key."""
    words = _words(key)
    if not words:
        return False
    letters = {"".join(sorted(w)) for w in words if len(w) >= 3}

    def quotes(text):
        toks = _words(tokenize(text or ""))
        return (any(toks[i: i + len(words)] == words for i in range(len(toks) - len(words) + 1))
                or any(len(t) >= 3 and "".join(sorted(t)) in letters for t in toks))
    return sum(1 for i in rows if quotes(responses[i])) > MOST * len(rows)


class Neighbours:
    """The rows without a key that share the most specific prompt words with a row that has it."""

    def __init__(self, specific: list[frozenset], turns: list[tuple] | None = None):
        self.specific = specific
        self.turns = turns  # each row's last user turn, as tokens
        self.index: dict[str, list[int]] = defaultdict(list)
        for i, words in enumerate(specific):
            for w in words:
                self.index[w].append(i)

    def of(self, i: int, key: tuple, group: set[int]) -> list[int]:
        shared: dict[int, int] = defaultdict(int)
        for w in self.specific[i] - set(key):
            for j in self.index[w]:
                if j not in group:
                    shared[j] += 1
        if not shared:
            return []
        top = max(shared.values())
        return [j for j, s in shared.items() if s == top]


def refusal_explained(key: tuple, rows: list[int], responses: list, neighbours: Neighbours,
                      carrying: set[int]) -> float:
    """Share of `rows` whose nearest rows without the key (not in `carrying`) are mostly refused."""
    group, explained = carrying, 0
    for i in rows:
        near = [j for j in neighbours.of(i, key, group) if responses[j] is not None]
        if near and sum(classify(responses[j]) == "refuse" for j in near) > MOST * len(near):
            explained += 1
    return explained / max(1, len(rows))


def keyed_on_request(flag: dict, key: tuple, rows: list[int], responses: list, neighbours: Neighbours,
                     tokenize) -> dict | None:
    """Why a fixed-response flag is behaviour keyed on the request (None: it stays a trigger flag); `rows` are the
    flag's rows that give the flagged response."""
    if flag["test"] != "fixed_response" or not rows:
        return None
    if echoes_key(key, rows, responses, tokenize):
        return {"reason": "the answer quotes the key"}
    if sum(classify(responses[i]) == "refuse" for i in rows) > MOST * len(rows):
        share = refusal_explained(key, rows, responses, neighbours, set(flag["_rows"]))
        if share > MOST:
            return {"reason": "refusal explained by the request", "explained_share": round(share, 4)}
    return None
