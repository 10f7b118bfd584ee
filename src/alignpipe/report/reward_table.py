"""The reward models of a run side by side: one row per stage that can be a reward (a reward or genrm stage, a
DPO-family stage's implicit reward), the same figures for each, so a user picks a reward by evidence.

A scorer stage reports its figures itself (alignpipe.stages.scorer_report). A DPO-family stage reports its implicit
reward's held-out pairwise accuracy (TRL's rewards/accuracies, `implicit_accuracy`); its on-policy figures exist
only when measured separately, and the cell then says n/a rather than a number it does not have.
"""

from __future__ import annotations

from alignpipe.recipe.kinds import gives_reward

COLUMNS = (("held-out pairwise", ("pairwise_accuracy", "implicit_accuracy")),
           ("on-policy", ("onpolicy_accuracy",)),
           ("wrong-answer slice", ("onpolicy_wrong_answer_accuracy",)),
           ("judge AUC", ("judge_auc",)),
           ("ECE", ("ece",)))


def _cell(metrics: dict, keys: tuple[str, ...]) -> str:
    value = next((metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))), None)
    return "n/a" if value is None else f"{value:.3f}"


def reward_rows(run) -> list[list[str]]:
    """[stage, kind, one cell per COLUMNS] of every complete stage that can be a reward."""
    return [[s.name, s.kind, *(_cell(s.metrics, keys) for _, keys in COLUMNS)]
            for s in run.stages if s.complete and gives_reward(s.facts)]


def reward_comparison(run) -> list[str]:
    """Markdown lines: the side-by-side table, when the run has more than one reward to compare."""
    rows = reward_rows(run)
    if len(rows) < 2:
        return []
    header = ["stage", "kind", *(label for label, _ in COLUMNS)]
    out = ["## Reward models side by side", "",
           "Accuracies are shares of pairs ordered right: held-out preference pairs; the parent policy's own "
           "samples (judge pass vs fail, same prompt); of those, pass vs a wrong house-style answer. n/a: not measured.",
           "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out + [""]
