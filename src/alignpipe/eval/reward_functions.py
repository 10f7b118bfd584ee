"""A reward function a recipe names as `module:function` (ppo, grpo and rloo's `reward_function`), and whether it is
the embedded world's judge: a stage that trains on the judge cannot be judged by it (`eval.independence`)."""

from __future__ import annotations

from collections.abc import Callable

from alignpipe.callables import import_callable
from alignpipe.data.world import judge_reward
from alignpipe.data.world_tools import tool_judge_reward, tool_shaped_reward
from alignpipe.errors import RecipeError

JUDGE_FUNCTION = "alignpipe.data.world:judge_reward"
JUDGE_PREFIX = "judge:"  # `reward_function: judge:<name>`: the stage's judge <name> is its reward (alignpipe.rl.judge_reward)


def load_function(spec: str, where: str = "", key: str = "reward_function") -> Callable[..., list[float]]:
    """The function named `module:function` (imported now, so a typo fails before training)."""
    return import_callable(spec, "reward function", JUDGE_FUNCTION, where=where, key=key)


def is_judge(spec: str | None) -> bool:
    """Does this reward function train on the embedded world's judge (so its pass rate is no longer
    an independent measure)?"""
    if not spec:
        return False
    try:
        # the tool rewards are the world's judge on plain tasks (data/world_tools.py)
        return load_function(spec) in (judge_reward, tool_judge_reward, tool_shaped_reward)
    except RecipeError:
        return spec == JUDGE_FUNCTION


def zero_reward(prompts, completions, **kwargs) -> list[float]:
    """0.0 for every response: the reward held at zero, so a PPO stage's only objectives are its KL penalty, its
    end-of-turn penalty and its entropy term (the sharpening baseline of docs/ppo.md)."""
    return [0.0] * len(completions)
