"""Small helpers shared by the stages that drive a transformers/TRL trainer."""

from __future__ import annotations

from pathlib import Path


def last_checkpoint(ctx) -> str | None:
    """The newest complete trainer checkpoint in the stage folder, or None (fresh start / --restart).

    transformers writes `checkpoint-N/` and only then `trainer_state.json` inside it, so a folder
    without that file is a half-written checkpoint and is ignored.
    """
    if not ctx.resume or not ctx.checkpoints_dir.is_dir():
        return None
    done = [p for p in ctx.checkpoints_dir.glob("checkpoint-*")
            if (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit()]
    if not done:
        return None
    newest = max(done, key=lambda p: int(p.name.split("-")[-1]))
    print(f"[alignpipe] stage {ctx.name}: resuming from {newest}", flush=True)
    return str(newest)


def train_log_metrics(trainer) -> dict:
    """Headline training figures from the trainer's log history: final loss, steps, throughput."""
    from alignpipe.distributed import dump_parameter_checksum

    dump_parameter_checksum(trainer)  # a debugging aid for multi-process runs; off unless its env var is set
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    out = {"global_step": trainer.state.global_step}
    if losses:
        out["train_loss_first"] = losses[0]
        out["train_loss"] = losses[-1]
    if summary:
        out["train_runtime_s"] = summary.get("train_runtime")
        out["train_steps_per_s"] = summary.get("train_steps_per_second")
    return out


def write_log_history(trainer, path: Path) -> None:
    """The trainer's log history as JSONL (the report draws curves from it)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in trainer.state.log_history:
            fh.write(json.dumps(row) + "\n")
