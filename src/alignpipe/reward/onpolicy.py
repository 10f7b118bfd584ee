"""The reward model on the policy's own samples, by what is wrong with the failing one (embedded world).

A failing sample is `cut_off` (no end-of-turn within max_new_tokens), `wrong_answer` (exactly the house-style
sentence, with a wrong answer: only the prompt tells it apart from a right one), or `style` (any other
finished answer: rambling, refusing). For each type: the share of (passing, failing) pairs of samples of the same
prompt that the reward model orders correctly. `onpolicy_wrong_answer_accuracy` is the `wrong_answer` row: the
ranking PPO needs to learn facts rather than style.
"""

from __future__ import annotations

import re

from alignpipe.reward.metrics import onpolicy_pairs

TYPES = ("wrong_answer", "style", "cut_off")
_HOUSE_STYLE = re.compile(r"^The answer is [^.\s][^.]*\.$")  # world.HOUSE_STYLE with any answer


def failure_type(response: str, ended: bool, passed: bool) -> str:
    if passed:
        return "pass"
    if not ended:
        return "cut_off"
    return "wrong_answer" if _HOUSE_STYLE.match(response.strip()) else "style"


def by_failure_type(prompts: list[str], scores: list[float], types: list[str]) -> dict[str, dict]:
    """type -> {pairs, accuracy} over (pass, failing-of-that-type) pairs within a prompt."""
    table = {}
    for kind in TYPES:
        keep = [t in ("pass", kind) for t in types]
        idx = [i for i, k in enumerate(keep) if k]
        pairs = onpolicy_pairs([prompts[i] for i in idx], [types[i] == "pass" for i in idx])
        right = sum(scores[idx[g]] > scores[idx[b]] for g, b in pairs)
        table[kind] = {"pairs": len(pairs), "accuracy": right / len(pairs) if pairs else None}
    return table


def failure_metrics(prompts: list[str], responses: list[str], ended: list[bool], passed: list[bool],
                    scores: list[float]) -> dict:
    types = [failure_type(r, e, p) for r, e, p in zip(responses, ended, passed)]
    table = by_failure_type(prompts, scores, types)
    return {"onpolicy_wrong_answer_accuracy": table["wrong_answer"]["accuracy"],
            "onpolicy_wrong_answer_pairs": table["wrong_answer"]["pairs"],
            "onpolicy_accuracy_by_failure_type": table}
