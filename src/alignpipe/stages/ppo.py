"""PPO against a reward model or function (RLHF step 3): the stage wires the recipe to alignpipe's own
trainer, `alignpipe.rl.ppo_trainer.PPOTrainer` (PPO left TRL in 1.13), and evaluates the result as every
policy stage does, then looks for reward hacking against the parent. Optionally PPO-ptx: `ptx_data` is the
plain text whose next-token loss each optimiser step also takes (`trainer.ptx_coef`).

With LoRA one copy of the base weights serves the policy (adapter on), the reference (adapter off)
and the value head beside them. Full fine-tuning keeps a frozen copy as the reference.
Recipe:
    ppo:
      from: sft
      reward_model: reward            # or reward_function: alignpipe.data.world:judge_reward
      data: {embedded: rl_prompts}
      trainer: {total_updates: 60, rollout_batch_size: 64, learning_rate: 3.0e-5, kl_target: 2.0}
"""

from __future__ import annotations

# Heavy imports (torch, accelerate) stay inside the functions that use them: the CLI starts without them.
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from alignpipe.data.loading import check_spec, load_family
from alignpipe.errors import RecipeError
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.parse import from_dict
from alignpipe.recipe.schema import StageConfig
from alignpipe.rl import rewards
from alignpipe.rl.ppo_trainer import PPOFolders, PPOSettings, PPOTrainer
from alignpipe.rl.rewards import check_reward_source
from alignpipe.stages.curves import along_training
from alignpipe.stages.helpers import evaluate_policy, load_prompts, lora_config, pack

if TYPE_CHECKING:
    import torch

    from alignpipe.stages.context import StageContext


@dataclass
class Config(StageConfig):
    reward_model: str | None = None  # a reward stage of this recipe
    reward_function: str | None = None  # or `module:function` in TRL's reward-function form
    ptx_data: dict = field(default_factory=dict)  # plain text for PPO-ptx, e.g. {embedded: corpus} or {path: ...}
    # with reward_model naming a DPO-family stage: ratio (beta * log pi/pi_ref, the implicit reward) or likelihood
    # (beta * log pi, the DPO policy's own likelihood of the response, no reference; docs/ppo.md)
    implicit_reward: str = "ratio"


def trainer_config_class():
    return PPOSettings  # alignpipe's trainer: its settings are the `trainer:` block


def settings(recipe, name: str) -> PPOSettings:
    """The stage's PPO settings, type-checked like the rest of the recipe."""
    where, key = str(recipe.path), f"stages.{name}.trainer"
    s = from_dict(PPOSettings, recipe.stages[name].trainer, where, key)
    positive = ("total_updates", "rollout_batch_size", "minibatch_size", "forward_batch_size", "ppo_epochs",
                "learning_rate", "max_new_tokens", "temperature", "kl_horizon", "clip_range", "clip_range_value")
    for field in positive:
        if not getattr(s, field) > 0:
            raise RecipeError(f"{field} must be > 0, got {getattr(s, field)!r}", where=where, key=f"{key}.{field}",
                              fix=f"set a positive {field}")
    if s.minibatch_size > s.rollout_batch_size:
        raise RecipeError("minibatch_size is larger than rollout_batch_size", where=where, key=f"{key}.minibatch_size",
                          fix="use a minibatch no larger than the rollout batch")
    choices = {"lr_schedule": ("constant", "linear"), "kl_estimator": ("k1", "k2", "k3")}
    for field, allowed in choices.items():
        if getattr(s, field) not in allowed:
            raise RecipeError(f"{field} {getattr(s, field)!r} is not one of {allowed}", where=where,
                              key=f"{key}.{field}", fix=f"use one of {', '.join(allowed)}")
    return s


def check(recipe, name: str, where: str) -> None:
    cfg = recipe.stages[name]
    key = f"stages.{name}"
    s = settings(recipe, name)

    check_reward_source(recipe, name, where, grouped=False)
    check_implicit_reward(recipe, name, where)
    if s.ptx_coef > 0 and not cfg.ptx_data:
        raise RecipeError("ptx_coef > 0 needs text to train on", where=where, key=f"{key}.ptx_data",
                          fix="e.g. ptx_data: {embedded: corpus}, or set trainer.ptx_coef: 0")
    if "embedded" in cfg.ptx_data:
        if cfg.ptx_data["embedded"] != "corpus":
            raise RecipeError(f"ptx_data: embedded {cfg.ptx_data['embedded']!r} is not plain text", where=where,
                              key=f"{key}.ptx_data.embedded", fix="use {embedded: corpus} or a text file")
    elif cfg.ptx_data:  # a text file: read it now, as pretraining would

        check_spec(cfg.ptx_data, recipe.path.parent, where, f"{key}.ptx_data", "text")
    if cfg.from_ is None:
        raise RecipeError("a ppo stage starts from a policy stage", where=where, key=f"{key}.from",
                          fix="set from: sft")


def check_implicit_reward(recipe, name: str, where: str) -> None:
    """`implicit_reward` is ratio or likelihood, and likelihood needs a DPO-family stage as the reward model."""
    from alignpipe.recipe.kinds import kind_of
    from alignpipe.reward.implicit import load_implicit_reward

    cfg, key = recipe.stages[name], f"stages.{name}.implicit_reward"
    if cfg.implicit_reward not in ("ratio", "likelihood"):
        raise RecipeError(f"implicit_reward {cfg.implicit_reward!r} is not one of ('ratio', 'likelihood')",
                          where=where, key=key, fix="use ratio (beta * log pi/pi_ref) or likelihood (beta * log pi)")
    if cfg.implicit_reward == "likelihood" and (
            cfg.reward_model is None or kind_of(recipe.stages[cfg.reward_model].kind).reward_loader
            is not load_implicit_reward):
        raise RecipeError("implicit_reward: likelihood scores with a DPO-family stage's policy", where=where, key=key,
                          fix="set reward_model: <a dpo stage>, or leave implicit_reward at ratio")


def load_ptx_blocks(ctx: StageContext, tokenizer, block_size: int) -> torch.Tensor:
    """The `ptx_data` texts, each ending in EOS, packed into blocks [N, block_size] (as pretraining packs)."""
    import torch

    if "embedded" in ctx.config.ptx_data:
        texts = ctx.world.corpus()
    else:
        texts_ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, data=ctx.config.ptx_data))
        texts = [r["text"] for r in load_family(texts_ctx, "text")]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pack([d + [tokenizer.eos_token_id] for d in ids], block_size)
    if not blocks:
        raise RecipeError(f"ptx_data gives no block of {block_size} tokens", where=str(ctx.recipe.path),
                          key=f"stages.{ctx.name}.ptx_data", fix="give more text, or a smaller ptx_block_size")
    return torch.tensor(blocks, dtype=torch.long)


def run(ctx: StageContext) -> dict:
    cfg, s = ctx.config, settings(ctx.recipe, ctx.name)
    tokenizer = ctx.load_tokenizer()
    trainer = PPOTrainer(s, ctx.load_model, tokenizer, lora_config(ctx, "CAUSAL_LM"),
                         seed=ctx.seed if s.seed is None else s.seed,
                         folders=PPOFolders(ctx.dir / "train_log.jsonl", ctx.logs_dir, ctx.checkpoints_dir),
                         name=ctx.name, resume=ctx.resume, checkpoint_every=cfg.checkpoint_every or 25)
    judge = None
    if cfg.reward_model:
        source, artifact = rewards.from_reward_stage(ctx.stage_dir(cfg.reward_model), ctx.recipe.model,
                                                     reference_free=cfg.implicit_reward == "likelihood")
        artifact.model.to(trainer.device).eval()
    elif rewards.judge_name(cfg.reward_function):
        source, judge = rewards.from_recipe_judge(cfg, ctx.recipe, ctx.name)
    else:
        source = rewards.from_function(cfg.reward_function, str(ctx.recipe.path))
    ptx_blocks = load_ptx_blocks(ctx, tokenizer, s.ptx_block_size) if s.ptx_coef > 0 else None
    along = along_training(ctx, tokenizer, trainer.reference, lambda: trainer.unwrapped.lm, s.total_updates,
                           main=trainer.is_main_process)
    figures = {**trainer.train(source, load_prompts(ctx), ptx_blocks, on_update=along.on_update), **along.finish()}

    # --- save the policy (LoRA: the adapter only; its base is the parent, recorded in the manifest)
    metrics: dict = {"updates": s.total_updates, "reward_source": cfg.reward_model or cfg.reward_function,
                     "judge_used_for_training": rewards.is_judge(cfg.reward_function),
                     "reward_normalisation": source.normalisation, **figures}
    if judge is not None:  # every response the judge was asked about, and how many failed
        metrics.update({f"reward_judge_{k}": v for k, v in judge.counts.items()})
    trainer.save(ctx.model_dir)

    # --- evaluate as every policy stage does, then look for reward hacking (main process)
    if cfg.reward_model:
        del source, artifact  # the evaluation loads the reward model itself
    if trainer.is_main_process:
        trainer.unwrapped.eval()
        metrics.update(evaluate_policy(ctx, trainer.unwrapped.lm, tokenizer, trainer.reference, against_parent=True))
    if trainer.world > 1:  # every process returns the same metrics (the runner checks gates on each)
        from accelerate.utils import broadcast_object_list

        metrics = broadcast_object_list([metrics], from_process=0)[0]
    trainer.accelerator.wait_for_everyone()
    return metrics


DECLARES = (StageKind("ppo", Config, run, trainer_config_class, family="prompts", embedded="rl_prompts",
                      references=("reward_model",), trained_on_reward=True, check=check),)
