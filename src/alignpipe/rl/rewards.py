"""Where an RL stage's reward comes from: a reward stage's model, or a Python function.

A reward model's raw score is normalised with the mean/std its reward stage measured on held-out
pairs, so a score of +1 means "one standard deviation better than usual" whatever the model's scale.
A Python function `module:function` takes TRL's reward-function form for conversational data,
`fn(prompts, completions, **kwargs) -> list[float]` with each prompt a list of messages and each
completion `[{"role": "assistant", "content": ...}]` (e.g. `alignpipe.data.world:judge_reward`), so
the same function serves the ppo, grpo and rloo stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alignpipe.errors import RecipeError
from alignpipe.eval.reward_functions import JUDGE_FUNCTION, is_judge, load_function  # noqa: F401 - the stages' names
from alignpipe.recipe.kinds import kind_of
from alignpipe.reward.artifact import load_reward_model, score

def check_reward_source(recipe, name: str, where: str) -> None:
    """An RL stage names exactly one reward: a reward stage of the recipe, or a loadable `module:function`;
    and it has prompts."""
    cfg, key = recipe.stages[name], f"stages.{name}"
    if (cfg.reward_model is None) == (cfg.reward_function is None):
        raise RecipeError(f"a {cfg.kind} stage needs exactly one reward: `reward_model` or `reward_function`",
                          where=where, key=key, fix="set reward_model: <a reward stage> or reward_function: "
                                                    "alignpipe.data.world:judge_reward")

    if cfg.reward_model is not None and not kind_of(recipe.stages[cfg.reward_model].kind).scorer:
        raise RecipeError(f"{cfg.reward_model!r} is not a reward stage", where=where, key=f"{key}.reward_model",
                          fix="name a stage of kind reward")
    if cfg.reward_function is not None:
        load_function(cfg.reward_function, where, f"{key}.reward_function")
    if not cfg.data:
        raise RecipeError("no prompts", where=where, key=f"{key}.data", fix="e.g. data: {embedded: rl_prompts}")


@dataclass
class RewardSource:
    """`raw(prompts, responses)` -> scores as the source gives them; the trainer normalises them as
    (raw - mean) / std. Prompts are conversations (lists of messages), responses the assistant's text."""

    name: str  # "reward stage <name>" or the function's spec, for logs
    raw_fn: Callable[[list[list[dict]], list[str]], list[float]]
    mean: float = 0.0
    std: float = 1.0

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return [float(s) for s in self.raw_fn(prompts, responses)]


def from_reward_stage(stage_dir, spec=None, batch_size: int = 64) -> tuple[RewardSource, object]:
    """(source, the loaded reward artifact) for a reward stage's model, normalised by its mean/std."""
    artifact = load_reward_model(stage_dir, spec)
    std = float(artifact.std) if artifact.std and artifact.std > 0 else 1.0
    source = RewardSource(name=f"reward stage {stage_dir}",
                          raw_fn=lambda p, r: score(artifact, p, r, batch_size=batch_size),
                          mean=float(artifact.mean), std=std)
    return source, artifact


def from_function(spec: str, where: str = "") -> RewardSource:
    fn = load_function(spec, where)
    return RewardSource(name=spec, raw_fn=lambda p, r: fn(
        prompts=p, completions=[[{"role": "assistant", "content": text}] for text in r]))
