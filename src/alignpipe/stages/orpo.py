"""ORPO and CPO / SimPO (kinds `orpo`, `cpo`): reference-free preference training on pairs.

TRL 1.16 ships both in `trl.experimental` (`trl.experimental.orpo.ORPOTrainer`,
`trl.experimental.cpo.CPOTrainer`): their interface may change in a TRL minor release, which is why
alignpipe pins TRL's range. SimPO is the `cpo` kind with `trainer: {loss_type: simpo, cpo_alpha: 0}`.
Neither keeps a reference model while training: ORPO adds an odds-ratio term to the SFT loss on the
chosen response; CPO/SimPO contrast the policy's (length-normalised, for SimPO) log-probabilities
of chosen and rejected. The starting policy is loaded once more only to measure the KL figure of the
shared evaluation (with `lora:` it is the adapter switched off: no second copy).

Data: the pairs family, as for dpo (`{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}`).
"""

from __future__ import annotations

# Heavy imports (trl, datasets) stay inside the functions that use them: the CLI starts without them.
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.errors import RecipeError
from alignpipe.recipe.schema import StageConfig
from alignpipe.stages.curves import trl_callback
from alignpipe.stages.helpers import (check_policy_references, evaluate_policy, lora_config, preference_pairs,
                                     start_as_reference)
from alignpipe.recipe.kinds import StageKind
from alignpipe.stages import training
from alignpipe.stages.training import train, train_log_metrics, write_log_history

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")  # CPOConfig.loss_type in TRL 1.16


@dataclass
class Config(StageConfig):
    # reward stage whose score is reported beside the judge (evaluation only). Unset: the recipe's first
    # reward stage that is complete when this stage runs.
    reward_model: str | None = None


def orpo_config_class():
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


def cpo_config_class():
    from trl.experimental.cpo import CPOConfig

    return CPOConfig


def check_cpo(recipe, name: str, where: str) -> None:
    check_policy_references(recipe, name, where)
    cfg = recipe.stages[name]
    loss_type = cfg.trainer.get("loss_type")
    if loss_type is not None and loss_type not in CPO_LOSS_TYPES:
        raise RecipeError(f"unknown CPO loss type {loss_type!r}", where=where, key=f"stages.{name}.trainer.loss_type",
                          fix=f"use one of {', '.join(CPO_LOSS_TYPES)} (simpo: SimPO)")


def build_trainer(ctx: StageContext):
    from datasets import Dataset

    if ctx.kind is CPO:
        from trl.experimental.cpo import CPOTrainer as trainer_class
    else:
        from trl.experimental.orpo import ORPOTrainer as trainer_class
    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    train_rows, heldout_rows = preference_pairs(ctx)
    train_ds, eval_ds = Dataset.from_list(train_rows), Dataset.from_list(heldout_rows)
    # the DPO stage's budget and learning rate (docs/dpo.md compares them on the same SFT parent)
    defaults = dict(max_length=128, per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=2e-4,
                    lr_scheduler_type="cosine", warmup_steps=5, max_steps=100, beta=0.1, remove_unused_columns=False)
    args = ctx.trainer_args(ctx.kind.trainer_config(), **defaults)
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, peft_config=lora_config(ctx, "CAUSAL_LM"))
    return trainer


def implicit_reward_metrics(trainer) -> dict:
    """The trainer's own rewards (beta-scaled policy log-probabilities; no reference) on held-out pairs."""
    out = trainer.evaluate(metric_key_prefix="eval")
    names = {"rewards/accuracies": "implicit_accuracy", "rewards/margins": "implicit_margin",
             "rewards/chosen": "implicit_reward_chosen", "rewards/rejected": "implicit_reward_rejected",
             "logps/chosen": "logp_chosen", "logps/rejected": "logp_rejected", "nll_loss": "nll_loss",
             "log_odds_ratio": "log_odds_ratio"}
    metrics = {"heldout_loss": out["eval_loss"], "implicit_accuracy_n": len(trainer.eval_dataset)}
    metrics.update({new: float(out[f"eval_{old}"]) for old, new in names.items() if f"eval_{old}" in out})
    return metrics


def run(ctx: StageContext) -> dict:
    trainer = build_trainer(ctx)
    curves = trl_callback(ctx, trainer.processing_class, lambda: start_as_reference(ctx, trainer.model),
                          trainer.args.max_steps)
    trainer.add_callback(curves)
    train(trainer, ctx)
    args = trainer.args
    metrics = {**train_log_metrics(trainer), "beta": args.beta, **implicit_reward_metrics(trainer),
               **curves.along.finish()}
    if ctx.kind is CPO:
        metrics["loss_type"] = args.loss_type
    write_log_history(trainer, ctx.dir / "train_log.jsonl")
    tokenizer = trainer.processing_class
    training.save_stage_model(trainer, tokenizer, ctx.model_dir)
    policy = trainer.model
    # KL is measured against the start (ORPO/CPO train without a reference)
    metrics.update(evaluate_policy(ctx, policy, tokenizer, lambda: start_as_reference(ctx, policy)))
    return metrics


ORPO = StageKind("orpo", Config, run, orpo_config_class, family="pairs", embedded="pairs", references=("reward_model",),
                  evaluated_with=("reward_model",),
                 user_split=True, check=check_policy_references)
CPO = StageKind("cpo", Config, run, cpo_config_class, family="pairs", embedded="pairs", references=("reward_model",),
                  evaluated_with=("reward_model",),
                user_split=True, check=check_cpo)
DECLARES = (ORPO, CPO)
