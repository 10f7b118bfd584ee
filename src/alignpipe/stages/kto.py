"""Kahneman-Tversky optimisation (kind `kto`): TRL's KTOTrainer (stable, `trl.KTOTrainer`) on unpaired rows.

Each row is one response with a boolean label, desirable or not: `{"prompt": [user], "completion":
[assistant], "label": bool}`. A data file in that form (`prompt`/`completion`/`label`), in
LLaMA-Factory's KTO form (`messages` ending in the judged assistant reply, plus `label`), or in a
pair format (each pair becomes a desirable and an undesirable row) is accepted; the embedded world's
pairs are split the same way and shuffled with the recipe's seed (KTO estimates its KL term from
neighbouring rows of a batch, which should not share a prompt).

The reference is the start, as in DPO: a frozen copy for full fine-tuning, the adapter switched off
with `lora:` (one copy of the base weights). Metrics: the shared judge pass rate / KL / reward-model
score, and KTO's implicit rewards of desirable and undesirable held-out rows.
"""

from __future__ import annotations

# Heavy imports (trl, datasets; rl.policy (which imports them)) stay inside the functions that use them: the CLI starts
# without them.
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import StageConfig
from alignpipe.stages import training
from alignpipe.stages.curves import trl_callback
from alignpipe.stages.helpers import check_policy_references, evaluate_policy, lora_config, rows
from alignpipe.stages.training import train, train_log_metrics, write_log_history

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext


@dataclass
class Config(StageConfig):
    # reward stage whose score is reported beside the judge (evaluation only). Unset: the recipe's first
    # reward stage that is complete when this stage runs.
    reward_model: str | None = None


def trainer_config_class():
    from trl import KTOConfig

    return KTOConfig


def unpaired(ctx: StageContext) -> tuple[list[dict], list[dict]]:
    """(train, held-out) unpaired rows: the embedded world's pairs split in two and shuffled, or a user
    dataset (unpaired or paired, see the module doc) split by the recipe's held-out prompts."""

    def embedded(world) -> tuple[list[dict], list[dict]]:
        out = []
        for split in ("train", "eval"):
            found = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                     for p in world.preference_rows(split) for side in ("chosen", "rejected")]
            random.Random(f"{ctx.seed}:kto:{split}").shuffle(found)
            out.append(found)
        return out[0], out[1]

    return rows(ctx, embedded, 200)


def build_trainer(ctx: StageContext):
    """The KTOTrainer for this stage, and the reference as a model (None with LoRA: the adapter off)."""
    from datasets import Dataset
    from trl import KTOTrainer

    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    peft_config = lora_config(ctx, "CAUSAL_LM")
    reference = None if peft_config is not None else ctx.load_model().eval().requires_grad_(False)
    train_rows, heldout_rows = unpaired(ctx)
    train_ds, eval_ds = Dataset.from_list(train_rows), Dataset.from_list(heldout_rows)
    # the DPO stage's budget and learning rate (docs/dpo.md compares them on the same SFT parent)
    args = ctx.trainer_args(trainer_config_class(), max_length=128, per_device_train_batch_size=32,
                            per_device_eval_batch_size=64, learning_rate=2e-4, lr_scheduler_type="cosine",
                            warmup_steps=5, max_steps=100, beta=0.1)
    trainer = KTOTrainer(model=model, ref_model=reference, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config)
    return trainer, reference


def implicit_reward_metrics(trainer) -> dict:
    """KTO's implicit rewards beta * log(pi/ref) of the held-out desirable (`chosen`) and undesirable
    (`rejected`) rows, their margin, and the held-out loss."""
    out = trainer.evaluate(metric_key_prefix="eval")
    names = {"rewards/chosen": "implicit_reward_chosen", "rewards/rejected": "implicit_reward_rejected",
             "rewards/margins": "implicit_margin", "kl": "kto_kl", "logps/chosen": "logp_chosen",
             "logps/rejected": "logp_rejected"}
    row = trainer.state.log_history[-1]
    metrics = {"kto_loss": out["eval_loss"]}
    metrics.update({new: row[f"eval_{old}"] for old, new in names.items() if f"eval_{old}" in row})
    return metrics


def run(ctx: StageContext) -> dict:
    from alignpipe.rl.policy import AdapterOff

    trainer, reference = build_trainer(ctx)
    start = (lambda: reference) if reference is not None else (lambda: AdapterOff(trainer.model))
    curves = trl_callback(ctx, trainer.processing_class, start, trainer.args.max_steps)
    trainer.add_callback(curves)
    train(trainer, ctx)
    metrics = {**train_log_metrics(trainer), "loss_type": trainer.args.loss_type, "beta": trainer.args.beta,
               **implicit_reward_metrics(trainer), **curves.along.finish()}
    write_log_history(trainer, ctx.dir / "train_log.jsonl")
    tokenizer = trainer.processing_class
    training.save_stage_model(trainer, tokenizer, ctx.model_dir)
    policy = trainer.model
    metrics.update(evaluate_policy(ctx, policy, tokenizer, reference if reference is not None else AdapterOff(policy)))
    return metrics


DECLARES = (StageKind("kto", Config, run, trainer_config_class, family="kto", embedded="pairs",
                      references=("reward_model",), evaluated_with=("reward_model",), user_split=True,
                      check=check_policy_references),)
