"""Small helpers shared by the stages that drive a transformers/TRL trainer."""

from __future__ import annotations

# Heavy imports (torch, trl, transformers; rl.state (which imports them)) stay inside the functions that use them: the
# CLI starts without them.
import json
import shutil
import sys
import warnings
from pathlib import Path

from alignpipe.runtime import threads as thread_choice
from alignpipe.runtime.distributed import dump_parameter_checksum, fsdp_on_cpu
from alignpipe.runtime.progress import attach
def attach_progress(trainer, ctx):
    """The stage's progress bars on the trainer, in place of its raw-dict console printer (progress.py)."""
    return attach(trainer, f"stage {ctx.name}")


def last_checkpoint(ctx) -> str | None:
    """The newest complete trainer checkpoint in the stage folder, or None (fresh start / --restart).

    Half-written checkpoints (the process died while saving) are never used: they are removed, and
    the newest complete one before them is resumed from.
    """
    if not ctx.resume or not ctx.checkpoints_dir.is_dir():
        return None
    found = sorted((p for p in ctx.checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    done = [p for p in found if is_complete_checkpoint(p)]
    for torn in found:
        if torn not in done and (not done or int(torn.name.split("-")[-1]) > int(done[-1].name.split("-")[-1])):
            print(f"[alignpipe] stage {ctx.name}: removing half-written checkpoint {torn.name}", flush=True)
            shutil.rmtree(torn)
    if not done:
        return None
    print(f"[alignpipe] stage {ctx.name}: resuming from {done[-1]}", flush=True)
    return str(done[-1])


CPU_HEAD_TILE_COLUMNS = 4096


FUSED_HEAD_TILE = "_CHUNKED_LOGPROB_CHUNK_SIZE"  # in trl.trainer.utils: private, so checked before it is set


def narrow_fused_head_tiles() -> None:
    """On a CPU, TRL's fused LM head (DPO, KTO, GRPO, RLOO) in tiles of 4,096 vocabulary columns, not 32,768.

    It allocates a [tokens, tile] float buffer on every forward and backward: 57 MB for a 434-token DPO batch
    even with a 450-token vocabulary, and allocating and touching it cost more than the projection. make bench's
    dpo_full_live_ref work, 200 steps, 1 thread: 19.1 s -> 15.1 s with malloc on huge pages, 16.3 -> 15.0 s
    without; the same loss. A vocabulary narrower than a tile is one tile either way, so nothing changes there;
    a wider one sums its tiles in another order (float rounding)."""
    import torch  # heavy: imported by a stage that trains
    import trl  # heavy, as torch
    import trl.trainer.utils as trl_utils

    if torch.cuda.is_available():
        return
    if not hasattr(trl_utils, FUSED_HEAD_TILE):  # TRL renamed or dropped it: its default tile width is used
        warnings.warn(f"trl.trainer.utils.{FUSED_HEAD_TILE} is gone (TRL {trl.__version__}): "
                      f"the fused LM head runs in TRL's own tiles on this CPU (slower)", stacklevel=2)
        return
    if getattr(trl_utils, FUSED_HEAD_TILE) > CPU_HEAD_TILE_COLUMNS:
        setattr(trl_utils, FUSED_HEAD_TILE, CPU_HEAD_TILE_COLUMNS)


def train(trainer, ctx, choose_threads: bool = False) -> dict:
    """`trainer.train()` with the stage's progress bar, resumed from the newest complete checkpoint (if any),
    TRL's token count included; Ctrl-C becomes StageInterrupted (the runner prints the resume hint).

    With `choose_threads`, the torch threads are decided from the machine and the recipe (thread_choice,
    ALIGNPIPE_THREADS) and the manifest fields of that choice are returned ({} otherwise); training ends on the
    threads it started with (1 under make), so the evaluation after it runs on those.

    TRL's SFT, DPO and reward trainers keep the running `num_tokens` they log outside transformers'
    checkpointed state, so a resumed run would log it from 0 again. The count is saved into each
    checkpoint's `trainer_state.json` (as a stateful callback, written with the step it belongs to)
    and put back before training resumes.
    """
    # TRL's fused LM head (a module constant of TRL's, read at each forward) in narrow tiles on a CPU: set here,
    # where every trainer stage starts training, never as a side effect of building a config
    narrow_fused_head_tiles()
    fsdp_on_cpu(trainer, str(ctx.recipe.path), ctx.name)
    count_flos_once(trainer)
    attach_progress(trainer, ctx)
    checkpoint = last_checkpoint(ctx)
    saved = {}
    if checkpoint is not None:
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("stateful_callbacks") or {}
    # a checkpoint written without the count (an older alignpipe) resumes without it: transformers
    # cannot update a callback state that the checkpoint lacks
    if hasattr(trainer, "_total_train_tokens") and (checkpoint is None or TOKEN_COUNT in saved):
        trainer.add_callback(_token_count_callback(trainer))
        if checkpoint is not None:
            trainer._total_train_tokens = saved[TOKEN_COUNT]["attributes"]["total_train_tokens"]
    threads = None
    if choose_threads:
        import torch

        threads_before = torch.get_num_threads()
        at_once = thread_choice.stages_at_once(ctx.recipe.order(None), ctx.recipe.start_after, ctx.recipe.evaluated_with,
                                               ctx.name,
                                               thread_choice.usable_cores())
        threads = thread_choice.for_trainer(trainer, at_once)
        _log(ctx, f"torch threads: {threads['threads']} ({threads['why']})")
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt as err:
        raise StageInterrupted(trainer.state.global_step) from err
    finally:
        if threads is not None:
            torch.set_num_threads(threads_before)  # the evaluation after training, and later stages, start there
    if threads is None:
        return {}
    return thread_choice.manifest_fields(threads)


def _log(ctx, msg: str) -> None:
    print(f"[alignpipe] stage {ctx.name}: {msg}", file=sys.stderr, flush=True)


def count_flos_once(trainer) -> None:
    """transformers adds 6 x parameters x tokens to `total_flos` every step, walking every module of the model
    each time to count its parameters without the embeddings (~3.5 ms of a ~140 ms LoRA SFT step on the bench's
    peer model, cProfile). The count does not change during training: take it once, at the first step."""
    model = trainer.model
    if not hasattr(model, "num_parameters"):
        return
    name = getattr(model, "main_input_name", "input_ids")
    count: list[int] = []

    def floating_point_ops(inputs) -> int:
        if name not in inputs:
            return 0
        if not count:
            count.append(model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[name].numel() * count[0]

    trainer.floating_point_ops = floating_point_ops


TOKEN_COUNT = "TokenCount"  # the callback's class name: its key in trainer_state.json's stateful_callbacks


def _token_count_callback(trainer):
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TokenCount(TrainerCallback, ExportableState):
        def __init__(self, trainer=None, **_):
            self.trainer = trainer

        def state(self) -> dict:
            return {"args": {}, "attributes": {"total_train_tokens": getattr(self.trainer, "_total_train_tokens", 0)}}

    return TokenCount(trainer)


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, with the trainer step it stopped at (the runner prints the resume hint)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"at step {step}")
        self.step = step


def newest_checkpoint_name(checkpoints_dir: Path) -> str | None:
    """The newest complete checkpoint a re-run resumes from (a trainer's checkpoint-N or PPO's update-N)."""
    from alignpipe.rl import state

    if not Path(checkpoints_dir).is_dir():
        return None
    found = [p for p in Path(checkpoints_dir).glob("checkpoint-*") if is_complete_checkpoint(p)]
    found += state.complete(Path(checkpoints_dir))
    return max(found, key=lambda p: int(p.name.rsplit("-", 1)[-1])).name if found else None


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether a transformers `checkpoint-N/` folder was written to the end.

    transformers (5.x `Trainer._save_checkpoint`) writes the weights, optimizer, scheduler and RNG
    state, and `trainer_state.json` last, each in one call of one process; so a state file that
    parses and names step N proves the files before it are whole. It is not written atomically, so a
    kill during that last write leaves it torn: that is why it is parsed, not just looked for.
    """
    try:
        state = json.loads((Path(folder) / "trainer_state.json").read_text())
        return int(state["global_step"]) == int(Path(folder).name.split("-")[-1])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def train_log_metrics(trainer) -> dict:
    """Headline training figures from the trainer's log history: final loss, steps, throughput."""
    stage = Path(trainer.args.output_dir).parent.name  # runs/<recipe>/<stage>/checkpoints
    # a debugging aid for multi-process runs; off unless its env var is set
    dump_parameter_checksum(stage, trainer.model_wrapped, trainer.model, trainer.state.global_step)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in trainer.state.log_history:
            fh.write(json.dumps(row) + "\n")


def save_stage_model(trainer, tokenizer, model_dir) -> None:
    """The stage's checkpoint: weights (or adapter) via the trainer, which writes on the main process
    only, and the tokenizer with its chat template, also from the main process only (two ranks
    rewriting chat_template.jinja at once was seen corrupting a child's template check)."""
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(model_dir))
