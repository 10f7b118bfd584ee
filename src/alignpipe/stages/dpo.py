"""Direct preference optimisation: TRL's DPOTrainer on (prompt, chosen, rejected) conversations.

Starts from a policy stage's checkpoint (usually sft), or from `model.path`. The reference policy
is the start itself: a frozen second copy for full fine-tuning, or, with `lora:`, the same model
with the adapter switched off (one copy of the base weights in memory). The loss is TRL's, chosen in the recipe's
`trainer:` block (`loss_type`, `loss_weights`, `beta`, `label_smoothing`, ...); see docs/dpo.md.

Metrics: the shared evaluation (`evaluate_stage`: health, KL to the reference, reward-model win rates,
judges), and DPO's implicit-reward accuracy and margins on held-out pairs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from alignpipe.errors import RecipeError
from alignpipe.recipe import StageConfig

# DPOConfig.loss_type values in TRL 1.16 (checked before anything is trained: TRL only fails at
# the first step). ORPO / CPO / SimPO are separate trainers in trl.experimental, KTO is trl.KTOTrainer.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
OTHER_TRAINERS = {
    "simpo": "SimPO is stage kind cpo with trainer.loss_type simpo",
    "orpo": "ORPO is stage kind orpo",
    "cpo": "CPO is stage kind cpo",
    "kto": "KTO is stage kind kto, on unpaired data",
}
# The stage's loss when the recipe names none: DPO plus TRL's SFT term on the chosen responses (docs/dpo.md).
DEFAULT_LOSS_TYPE, DEFAULT_LOSS_WEIGHTS = ("sigmoid", "sft"), (1.0, 2.0)
TRAIN_SLICE = 300  # training pairs whose implicit rewards are reported beside the held-out pairs'


DEFAULT_MAX_LENGTH = 128  # tokens per sequence unless the recipe's trainer.max_length says otherwise


@dataclass
class Config(StageConfig):
    # reward stage whose score is reported beside the judge (evaluation only; DPO never trains on it).
    # Unset: the recipe's first reward stage that is complete when this stage runs.
    reward_model: str | None = None


def trainer_config_class():
    from trl import DPOConfig

    return DPOConfig


def check_policy_references(recipe, name: str, where: str) -> None:
    """A preference stage (dpo, kto, orpo, cpo) starts from a policy and names a reward stage, if any."""
    cfg = recipe.stages[name]
    key = f"stages.{name}"
    # without `from`, the stage starts from `model.path` (validate rejects that for an `init:` model)
    if cfg.from_ is not None and recipe.stages[cfg.from_].kind == "reward":
        raise RecipeError(f"starts from reward stage {cfg.from_!r}, which is not a policy", where=where,
                          key=f"{key}.from", fix="set `from:` to an sft stage")
    if cfg.reward_model is not None and recipe.stages[cfg.reward_model].kind != "reward":
        raise RecipeError(f"{cfg.reward_model!r} is not a reward stage", where=where, key=f"{key}.reward_model",
                          fix="name a stage of kind reward, or remove the key")


def check(recipe, name: str, where: str) -> None:
    cfg = recipe.stages[name]
    key = f"stages.{name}"
    check_policy_references(recipe, name, where)
    loss_type = cfg.trainer.get("loss_type", DEFAULT_LOSS_TYPE)
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    for lt in loss_types:
        if lt in OTHER_TRAINERS:
            raise RecipeError(f"{lt!r} is not a DPO loss type in TRL 1.16: {OTHER_TRAINERS[lt]}", where=where,
                              key=f"{key}.trainer.loss_type", fix="see docs/dpo.md for the variants this stage has")
        if lt not in LOSS_TYPES:
            raise RecipeError(f"unknown DPO loss type {lt!r}", where=where, key=f"{key}.trainer.loss_type",
                              fix=f"use one or more of {', '.join(LOSS_TYPES)}")
    weights = cfg.trainer.get("loss_weights")
    if weights is not None and len(weights) != len(loss_types):
        raise RecipeError(f"{len(weights)} loss_weights for {len(loss_types)} loss types", where=where,
                          key=f"{key}.trainer.loss_weights", fix="give one weight per entry of loss_type")


def pairs(ctx) -> tuple[list[dict], list[dict]]:
    """(train, held-out) `{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}` rows: the embedded
    world's preference pairs, or a user dataset split by the recipe's held-out prompts."""
    if ctx.config.data.get("embedded") == "pairs":
        return ctx.world.preference_rows("train"), ctx.world.preference_rows("eval")
    from alignpipe.data.loading import load_split
    from alignpipe.labelling.sources import labelled_pairs, reads_stages

    if reads_stages(ctx.config.data):  # a label stage's pairs, alone or mixed
        return labelled_pairs(ctx, 200)[:2]

    return load_split(ctx, "pairs", 200)


def pair_counts(trainer, stage: str, train_rows: int, heldout_rows: int) -> dict:
    """How many pairs the trainer really uses. TRL 1.16 drops a pair whose prompt alone fills max_length
    (with truncation_mode keep_start the collator would cut every completion token): count what it kept."""
    kept = len(trainer.train_dataset)
    heldout = len(trainer.eval_dataset["heldout"])
    counts = {"pairs_trained_on": kept, "pairs_held_out": heldout,
              "pairs_dropped_prompt_too_long": (train_rows - kept) + (heldout_rows - heldout)}
    dropped = (f"; dropped {train_rows - kept} training and {heldout_rows - heldout} held-out pairs whose prompt "
               f"alone fills max_length {trainer.args.max_length} (raise max_length to keep them)"
               if counts["pairs_dropped_prompt_too_long"] else "")
    print(f"[alignpipe] stage {stage}: {kept} pairs trained on, {heldout} held out"
          f"{dropped}", flush=True)
    return counts


def adapter_disabled(peft_model):
    """The LoRA policy with its adapter switched off, as a model of its own: DPO's reference,
    without a second copy of the base weights (used for the KL figure)."""
    import torch

    class AdapterOff(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.policy = peft_model

        def forward(self, **kwargs):
            with self.policy.disable_adapter():
                return self.policy(**kwargs)

    return AdapterOff()


def implicit_reward_metrics(trainer) -> dict:
    """DPO's implicit reward r = beta * (log pi(y|x) - log ref(y|x)), via TRL's evaluation loop, on the held-out
    pairs and on a slice of the training pairs: how often chosen out-scores rejected, by what margin, the two
    rewards' means and the policy's summed log-probabilities of chosen and rejected."""
    names = {"rewards/accuracies": "implicit_accuracy", "rewards/margins": "implicit_margin",
             "rewards/chosen": "implicit_reward_chosen", "rewards/rejected": "implicit_reward_rejected",
             "logps/chosen": "logp_chosen", "logps/rejected": "logp_rejected"}
    metrics = {}
    for split, prefix in (("heldout", ""), ("train", "train_")):
        out = trainer.evaluate(split, metric_key_prefix=f"eval_{split}")
        # TRL puts its reward figures in the logged row (as eval_rewards/...), not in evaluate's return value
        row = trainer.state.log_history[-1]
        metrics[f"{prefix}dpo_loss"] = out[f"eval_{split}_loss"]
        metrics.update({prefix + new: row[f"eval_{old}"] for old, new in names.items() if f"eval_{old}" in row})
    return metrics


def build_trainer(ctx):
    """The DPOTrainer for this stage, the reference policy as a model (None with LoRA: the trainer
    switches the adapter off instead), and the pairs it trains on and holds out (`pair_counts`)."""
    from datasets import Dataset
    from trl import DPOTrainer

    from alignpipe.stages.sft import lora_config

    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    peft_config = lora_config(ctx, "CAUSAL_LM")
    # Full fine-tuning: the reference is a frozen copy of the start, loaded from the parent stage (TRL would
    # otherwise reload `config._name_or_path`, which for a merged LoRA parent is the wrong model).
    reference = None
    if peft_config is None:
        reference = ctx.load_model().eval().requires_grad_(False)

    train_rows, heldout_rows = pairs(ctx)
    train_ds = Dataset.from_list(train_rows)
    # implicit rewards are measured on the held-out pairs and, to compare, on a slice of the training pairs
    eval_ds = {"heldout": Dataset.from_list(heldout_rows),
               "train": train_ds.select(range(min(TRAIN_SLICE, len(train_ds))))}

    # Defaults measured on the embedded world (docs/dpo.md): plain sigmoid DPO over-optimises there, the SFT
    # term on the chosen responses keeps the policy fluent. Reference log-probs are computed once up front,
    # in one process only: TRL 1.16 caches them next to the dataset, and an in-memory dataset's cache
    # folder is a private temp folder per process (rank 1 then cannot find rank 0's file).
    from alignpipe.distributed import world_size

    defaults = dict(max_length=DEFAULT_MAX_LENGTH, per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=2e-4,
                    lr_scheduler_type="cosine", warmup_steps=5, max_steps=100, beta=0.1,
                    precompute_ref_log_probs=world_size() == 1)
    if "loss_type" not in ctx.config.trainer:  # our weights belong to our loss list only
        defaults.update(loss_type=list(DEFAULT_LOSS_TYPE), loss_weights=list(DEFAULT_LOSS_WEIGHTS))
    args = ctx.trainer_args(trainer_config_class(), **defaults)
    if args.precompute_ref_log_probs:  # done inside DPOTrainer's constructor, with TRL's own bar on a terminal
        print(f"[alignpipe] stage {ctx.name}: reference log-probs of {len(train_ds)} training and "
              f"{sum(len(d) for d in eval_ds.values())} held-out pairs", file=sys.stderr, flush=True)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config)
    return trainer, reference, pair_counts(trainer, ctx.name, len(train_rows), len(heldout_rows))


def run(ctx) -> dict:
    from alignpipe.evaluation import evaluate_stage
    from alignpipe.training import save_stage_model, train, train_log_metrics, write_log_history

    trainer, reference, counts = build_trainer(ctx)
    train(trainer, ctx)
    args = trainer.args
    metrics = {**train_log_metrics(trainer), **counts, "loss_type": list(args.loss_type),
               "beta": args.beta, **implicit_reward_metrics(trainer)}
    write_log_history(trainer, ctx.dir / "train_log.jsonl")  # after the evaluations: their rows too

    # save first (LoRA: the adapter only; the manifest records the base), then evaluate what was saved
    tokenizer = trainer.processing_class
    save_stage_model(trainer, tokenizer, ctx.model_dir)
    policy = trainer.model
    if reference is None:
        reference = adapter_disabled(policy)
    metrics.update(evaluate_stage(ctx, policy, tokenizer, reference))
    return metrics
