"""Direct preference optimisation: TRL's DPOTrainer on (prompt, chosen, rejected) conversations.

Starts from a policy stage's checkpoint (usually sft), or from `model.path`. The reference policy
is the start itself: a frozen second copy for full fine-tuning, or, with `lora:`, the same model
with the adapter switched off (one copy of the base weights in memory). The loss is TRL's, chosen in the recipe's
`trainer:` block (`loss_type`, `loss_weights`, `beta`, `label_smoothing`, ...); see docs/dpo.md.

Metrics: the shared evaluation (`evaluate_stage`: health, KL to the reference, reward-model win rates,
judges), and DPO's implicit-reward accuracy and margins on held-out pairs.
"""

from __future__ import annotations

# Heavy imports (trl, datasets; rl.policy (which imports them)) stay inside the functions that use them: the CLI starts
# without them.
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.errors import RecipeError
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import StageConfig
from alignpipe.reward.implicit import load_implicit_reward
from alignpipe.runtime.distributed import world_size
from alignpipe.runtime.padding_free import choose, flatten_padded_forward
from alignpipe.stages import training
from alignpipe.stages.curves import trl_callback
from alignpipe.stages.helpers import check_policy_references, evaluate_policy, lora_config, preference_pairs
from alignpipe.stages.training import train, train_log_metrics, write_log_history

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext

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
# The stage's loss when the recipe names none: TRL's (DPOConfig.loss_type ["sigmoid"], no weights). The default
# recipe's [sigmoid, sft] with weights [1, 2] is written in recipes/default.yaml, where it was tuned (docs/dpo.md).
DEFAULT_LOSS_TYPE = ("sigmoid",)
TRAIN_SLICE = 300  # training pairs whose implicit rewards are reported beside the held-out pairs'


DEFAULT_MAX_LENGTH = 128  # tokens per sequence unless the recipe's trainer.max_length says otherwise


@dataclass
class Config(StageConfig):
    # reward stage whose score is reported beside the judge (evaluation only; DPO never trains on it).
    # Unset: the recipe's first reward stage that is complete when this stage runs.
    reward_model: str | None = None
    # Padding-free forwards (alignpipe.runtime.padding_free): TRL builds and truncates its padded batches as always, and
    # each forward (policy and reference) runs their real tokens as one flattened row. null = auto (on a CPU or
    # with flash-attention, when a check on this model finds the flattened forward exact), true/false force it.
    # The manifest says which was used. (TRL 1.16's own `padding_free` is switched off inside DPOTrainer.)
    padding_free: bool | None = None


def trainer_config_class():
    from trl import DPOConfig

    return DPOConfig


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


def pair_counts(trainer, stage: str, train_rows: int, heldout_rows: int) -> dict:
    """How many pairs the trainer really uses. TRL 1.16 drops a pair whose prompt alone fills max_length
    (with truncation_mode keep_start the collator would cut every completion token): count what it kept."""
    kept = len(trainer.train_dataset)
    heldout, train_slice = len(trainer.eval_dataset["heldout"]), len(trainer.eval_dataset["train"])
    counts = {"pairs_trained_on": kept, "pairs_held_out": heldout,
              "pairs_dropped_prompt_too_long": (train_rows - kept) + (heldout_rows - heldout)}
    dropped = (f"; dropped {train_rows - kept} training and {heldout_rows - heldout} held-out pairs whose prompt "
               f"alone fills max_length {trainer.args.max_length} (raise max_length to keep them)"
               if counts["pairs_dropped_prompt_too_long"] else "")
    print(f"[alignpipe] stage {stage}: {kept} pairs trained on, {heldout} held out{dropped}; implicit rewards "
          f"measured on the {heldout} held-out pairs and {train_slice} of the training pairs", flush=True)
    return counts


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
        metrics[f"{prefix}implicit_accuracy_n"] = len(trainer.eval_dataset[split])  # the pairs the rates are of
    return metrics


def trainer_defaults() -> dict:
    """The DPOConfig values this kind sets when the recipe's `trainer:` does not: a CPU-sized budget (TRL's own
    are 3 epochs at learning rate 1e-6), TRL's loss and beta. Reference log-probs are computed once up front,
    in one process only: TRL 1.16 caches them next to the dataset, and an in-memory dataset's cache folder is a
    private temp folder per process (rank 1 then cannot find rank 0's file)."""
    return dict(max_length=DEFAULT_MAX_LENGTH, per_device_train_batch_size=32, per_device_eval_batch_size=64,
                learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=5, max_steps=100, beta=0.1,
                loss_type=list(DEFAULT_LOSS_TYPE), precompute_ref_log_probs=world_size() == 1)


def describe_loss(args) -> str:
    """`sigmoid` or `1 x sigmoid + 2 x sft`, with beta: what the stage trains on, said at its start."""
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    weights = args.loss_weights or [1.0] * len(types)
    terms = " + ".join(f"{w:g} x {t}" for t, w in zip(types, weights)) if len(types) > 1 else types[0]
    return f"{terms}, beta {args.beta:g}"


def check_prompts_fit(stage: str, where: str, tokenizer, model, args, rows: dict[str, list[dict]]) -> None:
    """Stop with one line, before TRL's constructor, when TRL would drop every training or held-out pair: it drops a
    pair whose prompt alone fills max_length, then its reference pass fails on nothing (`torch.cat(): expected a
    non-empty list`). Prompt lengths are the chat template's, as TRL tokenizes them; the first prompt that fits ends
    the check (one prompt rendered, in the usual case)."""
    if args.max_length is None or getattr(args, "truncation_mode", "keep_start") != "keep_start":
        return

    def length(row) -> int:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for what, pairs in rows.items():
        if not pairs or any(length(r) < args.max_length for r in pairs):
            continue
        lengths = sorted(length(r) for r in pairs)
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        suggest = min(limit, (lengths[int(0.9 * (len(lengths) - 1))] // 64 + 2) * 64)
        raise RecipeError(f"every one of the {len(pairs)} {what} pairs has a prompt of at least max_length "
                          f"{args.max_length} tokens (prompts: median {lengths[len(lengths) // 2]}, max {lengths[-1]}), "
                          "so TRL would drop them all", where=where, key=f"stages.{stage}.trainer.max_length",
                          fix=f"raise it: --set stages.{stage}.trainer.max_length={suggest} (the model reads at most "
                              f"{limit} tokens), or use shorter prompts")


def build_trainer(ctx: StageContext):
    """The DPOTrainer for this stage, the reference policy as a model (None with LoRA: the trainer
    switches the adapter off instead), and the pairs it trains on and holds out (`pair_counts`) with the
    batching it uses."""
    from datasets import Dataset
    from trl import DPOTrainer

    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    peft_config = lora_config(ctx, "CAUSAL_LM")
    # Full fine-tuning: the reference is a frozen copy of the start, loaded from the parent stage (TRL would
    # otherwise reload `config._name_or_path`, which for a merged LoRA parent is the wrong model).
    reference = None
    if peft_config is None:
        reference = ctx.load_model().eval().requires_grad_(False)

    batches = choose(model, ctx.config.padding_free, ctx.name)
    if batches.padding_free:  # before the trainer: its reference pre-computation runs in the constructor
        for m in (model, reference):
            if m is not None:
                flatten_padded_forward(m, batches)

    train_rows, heldout_rows = preference_pairs(ctx)
    train_ds = Dataset.from_list(train_rows)
    # implicit rewards are measured on the held-out pairs and, to compare, on a slice of the training pairs
    eval_ds = {"heldout": Dataset.from_list(heldout_rows),
               "train": train_ds.select(range(min(TRAIN_SLICE, len(train_ds))))}

    args = ctx.trainer_args(trainer_config_class(), **trainer_defaults())
    check_prompts_fit(ctx.name, str(ctx.recipe.path), tokenizer, model, args,
                      {"training": train_rows, "held-out": heldout_rows})
    print(f"[alignpipe] stage {ctx.name}: loss {describe_loss(args)}", file=sys.stderr, flush=True)
    if args.precompute_ref_log_probs:  # done inside DPOTrainer's constructor, with TRL's own bar on a terminal
        print(f"[alignpipe] stage {ctx.name}: reference log-probs of the pairs TRL keeps (prompt shorter than "
              f"max_length {args.max_length}; counted on the next line), computed once before training",
              file=sys.stderr, flush=True)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config)
    return trainer, reference, {**pair_counts(trainer, ctx.name, len(train_rows), len(heldout_rows)),
                                **batches.manifest()}


def run(ctx: StageContext) -> dict:
    from alignpipe.rl.policy import AdapterOff

    trainer, reference, counts = build_trainer(ctx)
    start = (lambda: reference) if reference is not None else (lambda: AdapterOff(trainer.model))
    curves = trl_callback(ctx, trainer.processing_class, start, trainer.args.max_steps)
    trainer.add_callback(curves)
    threads = train(trainer, ctx, choose_threads=True)
    args = trainer.args
    metrics = {**train_log_metrics(trainer), **counts, **threads, "loss_type": list(args.loss_type),
               "beta": args.beta, **implicit_reward_metrics(trainer), **curves.along.finish()}
    write_log_history(trainer, ctx.dir / "train_log.jsonl")  # after the evaluations: their rows too

    # save first (LoRA: the adapter only; the manifest records the base), then evaluate what was saved
    tokenizer = trainer.processing_class
    training.save_stage_model(trainer, tokenizer, ctx.model_dir)
    policy = trainer.model
    if reference is None:
        reference = AdapterOff(policy)  # the LoRA policy with its adapter switched off: no second copy
    metrics.update(evaluate_policy(ctx, policy, tokenizer, reference))
    return metrics


DECLARES = (StageKind("dpo", Config, run, trainer_config_class, family="pairs", embedded="pairs",
                      references=("reward_model",), evaluated_with=("reward_model",), user_split=True,
                      max_length=DEFAULT_MAX_LENGTH, check=check,
                      reward_loader=load_implicit_reward),)
