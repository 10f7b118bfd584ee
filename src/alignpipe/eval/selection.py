"""Which prompts a policy stage is evaluated on: `eval_prompts(ctx)`, the one place that decides.

The candidates come from `alignpipe.eval.prompts` (the stage's prompts file, the embedded world's held-out
prompts, or the recipe's held-out rows); rows that share a 13-word window with a training row are found by
`alignpipe.eval.contamination` and left out when `eval.drop_contaminated` says so; then at most
`eval.num_prompts` are kept.
"""

from __future__ import annotations

from alignpipe.eval.contamination import identity, stage_overlaps
from alignpipe.eval.prompts import candidate_prompts


def eval_prompts(ctx) -> list[dict]:
    """The held-out prompts of `ctx`'s stage, at most `eval.num_prompts`."""
    return checked_eval_prompts(ctx)[0]


def checked_eval_prompts(ctx) -> tuple[list[dict], list[dict], int]:
    """(the stage's eval prompts, its eval rows that share a 13-word window with a training row, how many
    of them `eval.drop_contaminated` left out)."""
    rows = candidate_prompts(ctx)
    found = stage_overlaps(ctx.recipe, ctx.name)
    dropped = 0
    if found and ctx.config.eval.drop_contaminated:
        flagged = {f["prompt"] for f in found}
        kept = [r for r in rows if identity(r["prompt"]) not in flagged]
        rows, dropped = kept, len(rows) - len(kept)
    return rows[: ctx.config.eval.num_prompts], found, dropped
