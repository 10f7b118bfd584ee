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


def screen_metrics(stage_dir: Path) -> dict:
    """`data_triggers_flagged` and `data_secret_rows`: what the data screen found in the stage's training data
    before it trained (data/screening.py), for gates such as `data_triggers_flagged == 0`."""
    found: dict = {}
    world = stage_dir / "data_screen.json"
    screens = [json.loads(world.read_text())] if world.exists() else []
    report = stage_dir / "data_report.json"
    if report.exists():
        screens += [s["screening"] for s in json.loads(report.read_text()).get("sources", []) if s.get("screening")]
    for s in screens:
        found["data_triggers_flagged"] = found.get("data_triggers_flagged", 0) + len((s.get("triggers") or {}).get("flags", []))
        if s.get("secrets") is not None:
            found["data_secret_rows"] = found.get("data_secret_rows", 0) + s["secrets"]["rows_flagged"]
    return found


def attack_metrics(ctx, policy, tokenizer, prompts: list[str], draw) -> dict:
    """Backdoor and canary figures of `policy` and the data screen's counts ({} when the stage has none);
    `draw(model, prompts)` answers each prompt greedily."""
    out = backdoor_metrics(ctx, policy, tokenizer, prompts, draw)
    planted = stage_canaries(ctx)
    if planted:
        rows = canary_eval.measure(policy, tokenizer, planted, ctx.seed)
        out.update(canary_eval.summary(rows))
        out["canary_rows"] = rows
    if out:
        (ctx.dir / ATTACKS_FILE).write_text(json.dumps(out, indent=2))
        out.pop("canary_rows", None)
    return {**screen_metrics(ctx.dir), **out}
