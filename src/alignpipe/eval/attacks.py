"""The data-attack part of every policy stage's evaluation (`eval.policy`): a planted trigger's attack success
rate (`eval.backdoor`) and the canaries' exposure and extraction (`eval.canaries`), in the stage's metrics (so
in its manifest and usable as gates: `attack_success_rate <= 0.05`, `canary_extracted_share == 0`), with the
details in `data_attacks.json` in the stage folder."""

from __future__ import annotations

import json
from pathlib import Path

from alignpipe.eval import canaries as canary_eval
from alignpipe.eval.backdoor import backdoor_metrics

ATTACKS_FILE = "data_attacks.json"


def stage_canaries(ctx) -> list[dict]:
    """The world's planted canaries (embedded data) and the rows of `eval.canaries`."""
    rows = ctx.world.canaries() if "embedded" in ctx.config.data and ctx.recipe.world.get("canaries") else []
    if ctx.config.eval.canaries:
        path = Path(ctx.config.eval.canaries)
        path = path if path.is_absolute() else ctx.recipe.path.parent / path
        rows = rows + canary_eval.read_canaries(path, f"stages.{ctx.name}.eval.canaries")
    return rows


def attack_metrics(ctx, policy, tokenizer, prompts: list[str], draw) -> dict:
    """Backdoor and canary figures of `policy` ({} when the stage has neither); `draw(model, prompts)` answers
    each prompt greedily."""
    out = backdoor_metrics(ctx, policy, tokenizer, prompts, draw)
    planted = stage_canaries(ctx)
    if planted:
        rows = canary_eval.measure(policy, tokenizer, planted, ctx.seed)
        out.update(canary_eval.summary(rows))
        out["canary_rows"] = rows
    if not out:
        return {}
    (ctx.dir / ATTACKS_FILE).write_text(json.dumps(out, indent=2))
    out.pop("canary_rows", None)
    return out
