"""GRPO and RLOO (kinds `grpo`, `rloo`): TRL's GRPOTrainer / RLOOTrainer, wired to this recipe.

Several responses per prompt; each is scored by a reward stage's model or a Python function
(`module:function`, TRL's reward-function form), and its advantage is its reward relative to the
others for the same prompt (GRPO: group mean/std; RLOO: leave-one-out mean), so no value model.
A response that never ends its turn gets `-missing_eot_penalty` on top, as a second reward function.

With `reward_function: alignpipe.data.world:judge_reward` the policy trains on the judge itself
(verifiable rewards): the metrics then say `judge_used_for_training: true`, and its judge pass rate
is a training score, not an independent measure.
"""

from __future__ import annotations

# Heavy imports (trl, datasets) stay inside the functions that use them: the CLI starts without them.
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.errors import RecipeError
from alignpipe.recipe.kinds import StageKind, kind_of
from alignpipe.recipe.schema import StageConfig
from alignpipe.reward.artifact import RewardArtifact, load_reward_model
from alignpipe.rl.rewards import check_reward_source, from_judge, is_judge, judge_name, load_function, trl_reward_function
from alignpipe.stages.curves import trl_callback
from alignpipe.stages.helpers import evaluate_policy, load_prompts, lora_config, start_as_reference
from alignpipe.stages.training import train, train_log_metrics, write_log_history

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext


@dataclass
class Config(StageConfig):
    reward_model: str | None = None  # a reward stage of this recipe
    reward_function: str | None = None  # or `module:function`, e.g. alignpipe.data.world:judge_reward
    missing_eot_penalty: float = 1.0  # subtracted from the reward of a response cut off unfinished
    max_tool_turns: int = 3  # with the recipe's `tools:`: model turns per rollout (rl/tool_rollout.py)
    tool_timeout_s: float = 2.0  # a tool call running longer gives an error result


def grpo_config_class():
    from trl import GRPOConfig

    return GRPOConfig


def rloo_config_class():
    from trl import RLOOConfig

    return RLOOConfig


def check(recipe, name: str, where: str) -> None:
    cfg = recipe.stages[name]
    key = f"stages.{name}"

    check_reward_source(recipe, name, where)
    if recipe.tools and kind_of(cfg.kind) is RLOO:
        raise RecipeError("rloo cannot execute tools: TRL's RLOOTrainer has no rollout_func or tools hook",
                          where=where, key=f"{key}.kind", fix="use kind grpo for tool rollouts, or drop `tools:`")
    if cfg.missing_eot_penalty and "reward_weights" in cfg.trainer:
        raise RecipeError("trainer.reward_weights is set by the stage (reward, then the end-of-turn penalty)",
                          where=where, key=f"{key}.trainer.reward_weights",
                          fix="remove it, or set missing_eot_penalty: 0 to weigh rewards yourself")


def missing_eot(end_ids: set[int]):
    """A TRL reward function: -1 for a completion that did not end with end-of-turn, else 0."""

    def missing_eot(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [0.0 if ids and ids[-1] in end_ids else -1.0 for ids in completion_ids]

    return missing_eot


def tool_rollouts(ctx: StageContext, max_tokens: int) -> dict:
    """GRPOTrainer's `rollout_func`: multi-turn rollouts that execute the recipe's tools, results masked."""
    import os

    from alignpipe.data.tools import resolve_tools
    from alignpipe.rl.tool_rollout import grpo_rollout_func

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.16
    tools = resolve_tools(ctx.recipe.tools, str(ctx.recipe.path))
    cfg = ctx.config
    return {"rollout_func": grpo_rollout_func(tools, cfg.max_tool_turns, max_tokens, cfg.tool_timeout_s)}


def tool_train_metrics(trainer) -> dict:
    stats = getattr(trainer, "_alignpipe_tool_stats", {"calls": 0, "failed": 0, "episodes": 0})
    return {"train_tool_calls_per_rollout": stats["calls"] / max(1, stats["episodes"]),
            "train_tool_failed_calls": stats["failed"], "train_tool_calls": stats["calls"]}


def run(ctx: StageContext) -> dict:
    from datasets import Dataset
    from trl import GRPOTrainer, RLOOTrainer

    cfg = ctx.config
    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    dataset = Dataset.from_list([{"prompt": p} for p in load_prompts(ctx)])

    # --- rewards: the reward model (TRL scores it; its tokenizer given explicitly, or TRL would ask the hub)
    judge = None
    if cfg.reward_model:
        artifact = load_reward_model(ctx.stage_dir(cfg.reward_model), ctx.recipe.model)
        if isinstance(artifact, RewardArtifact):  # a classifier TRL scores itself
            funcs, classes = [artifact.model], [artifact.tokenizer]
        else:  # a generative reward model, a DPO stage's implicit reward: scored by alignpipe
            funcs, classes = [trl_reward_function(artifact, cfg.reward_model)], [None]
    elif judge_name(cfg.reward_function):
        judge = from_judge(cfg, ctx.recipe, ctx.name)
        funcs, classes = [trl_reward_function(judge, cfg.reward_function)], [None]
    else:
        funcs, classes = [load_function(cfg.reward_function, str(ctx.recipe.path))], [None]
    defaults: dict = {}
    if cfg.missing_eot_penalty:
        funcs.append(missing_eot({tokenizer.eos_token_id, tokenizer.pad_token_id}))
        classes.append(None)
        defaults["reward_weights"] = [1.0, cfg.missing_eot_penalty]

    # the prototype's settings (80 steps x 4 prompts x 8 samples, lr 3e-5 constant, beta 0.1)
    args = ctx.trainer_args(ctx.kind.trainer_config(), per_device_train_batch_size=32, num_generations=8,
                            max_completion_length=40, learning_rate=3e-5, lr_scheduler_type="constant",
                            warmup_steps=0, beta=0.1, max_steps=80, logging_steps=5, remove_unused_columns=False,
                            **defaults)
    trainer_class = RLOOTrainer if ctx.kind is RLOO else GRPOTrainer
    extra = tool_rollouts(ctx, args.max_completion_length) if ctx.recipe.tools else {}
    trainer = trainer_class(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                            processing_class=tokenizer, reward_processing_classes=classes,
                            peft_config=lora_config(ctx, "CAUSAL_LM"), **extra)
    curves = trl_callback(ctx, tokenizer, lambda: start_as_reference(ctx, trainer.model), trainer.args.max_steps)
    trainer.add_callback(curves)
    train(trainer, ctx)
    write_log_history(trainer, ctx.dir / "train_log.jsonl")

    metrics = {**train_log_metrics(trainer), "reward_source": cfg.reward_model or cfg.reward_function,
               "judge_used_for_training": is_judge(cfg.reward_function), **curves.along.finish()}
    if judge is not None:  # every response the judge was asked about, and how many got no reward
        metrics.update({f"reward_judge_{k}": v for k, v in judge.counts.items()})
    if ctx.recipe.tools:
        metrics.update(tool_train_metrics(trainer))
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if rewards:
        metrics["train_reward_first"], metrics["train_reward_last"] = rewards[0], rewards[-1]
    trainer.save_model(str(ctx.model_dir))
    tokenizer.save_pretrained(str(ctx.model_dir))
    if cfg.reward_model:
        del artifact, funcs, classes  # evaluate_stage loads the reward model itself

    # --- evaluate; the reference is the starting policy (LoRA: the same weights with the adapter off)
    policy = trainer.model.eval()
    metrics.update(evaluate_policy(ctx, policy, tokenizer, lambda: start_as_reference(ctx, policy),
                                   against_parent=True))
    if metrics["judge_used_for_training"]:
        print(f"[alignpipe] stage {ctx.name}: trained on the judge ({cfg.reward_function}); its judge pass rate "
              "is a training score, not an independent measure", flush=True)
    return metrics


GRPO = StageKind("grpo", Config, run, grpo_config_class, family="prompts", embedded="rl_prompts",
                 references=("reward_model",), trained_on_reward=True, check=check)
RLOO = StageKind("rloo", Config, run, rloo_config_class, family="prompts", embedded="rl_prompts",
                 references=("reward_model",), trained_on_reward=True, check=check)
DECLARES = (GRPO, RLOO)
