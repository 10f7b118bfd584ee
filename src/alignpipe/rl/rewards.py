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

from alignpipe.errors import EvalError, RecipeError
from alignpipe.eval.reward_functions import JUDGE_FUNCTION, is_judge, load_function  # noqa: F401 - the stages' names
from alignpipe.recipe.kinds import gives_reward, kind_of
from alignpipe.reward.artifact import load_reward_model, score
from alignpipe.rl.judge_reward import JudgeReward, check_judge_reward, from_judge, judge_name

def check_reward_source(recipe, name: str, where: str, grouped: bool = True) -> None:
    """An RL stage names exactly one reward: a reward stage of the recipe, or a loadable `module:function`;
    and it has prompts."""
    cfg, key = recipe.stages[name], f"stages.{name}"
    if (cfg.reward_model is None) == (cfg.reward_function is None):
        raise RecipeError(f"a {cfg.kind} stage needs exactly one reward: `reward_model` or `reward_function`",
                          where=where, key=key, fix="set reward_model: <a reward stage> or reward_function: "
                                                    "alignpipe.data.world:judge_reward")

    if cfg.reward_model is not None and not gives_reward(kind_of(recipe.stages[cfg.reward_model].kind)):
        raise RecipeError(f"{cfg.reward_model!r} is not a reward stage", where=where, key=f"{key}.reward_model",
                          fix="name a stage of kind reward or genrm, or a dpo stage (its implicit reward)")
    if judge_name(cfg.reward_function) is not None:
        check_judge_reward(cfg, name, where)
        if not grouped and cfg.eval.judges[judge_name(cfg.reward_function)].pairwise:
            raise RecipeError(f"a pairwise judge compares responses to the same prompt; a {cfg.kind} stage samples "
                              "one response a prompt", where=where, key=f"{key}.reward_function",
                              fix="use it in a grpo or rloo stage, or name a verifier judge here")
    elif cfg.reward_function is not None:
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
    normalisation: str = "none"  # how raw scores become rewards, for the stage's record

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        scores = list(self.raw_fn(prompts, responses))
        missing = sum(s is None for s in scores)
        if missing:  # never a silent zero: PPO needs a reward for every response
            raise EvalError(f"{self.name}: {missing} of {len(scores)} responses got no reward",
                            fix="check the reward (a judge's endpoint and prompt template)")
        return [float(s) for s in scores]


def from_reward_stage(stage_dir, spec=None, batch_size: int = 64,
                      reference_free: bool = False) -> tuple[RewardSource, object]:
    """(source, the loaded reward artifact) for a reward stage's model, normalised by its mean/std.
    `reference_free`: a DPO stage's implicit reward without its reference, beta * log pi(y|x)."""
    artifact = load_reward_model(stage_dir, spec)
    if reference_free:
        artifact = artifact.reference_free()
    std = float(artifact.std) if artifact.std and artifact.std > 0 else 1.0
    normalisation = getattr(artifact, "normalisation", None) or \
        f"(raw - {float(artifact.mean):.6g}) / {std:.6g}: the reward stage's mean and std of its scores"
    source = RewardSource(name=f"reward stage {stage_dir}",
                          raw_fn=lambda p, r: score(artifact, p, r, batch_size=batch_size),
                          mean=float(artifact.mean), std=std, normalisation=normalisation)
    return source, artifact


def from_recipe_judge(cfg, recipe, name: str) -> tuple[RewardSource, JudgeReward]:
    """(source, the judge, whose `counts` the stage records) for `reward_function: judge:<name>`."""
    judge = from_judge(cfg, recipe, name)
    return RewardSource(name=f"judge {judge.name}", raw_fn=judge), judge


def trl_reward_function(scorer, name: str) -> Callable[..., list]:
    """A scorer (load_reward_model's, or a JudgeReward) in TRL's reward-function form for GRPO / RLOO:
    fn(prompts, completions, **kwargs) with conversational prompts and completions."""

    def reward(prompts, completions, **_):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        if isinstance(scorer, JudgeReward):
            return scorer(prompts, texts)
        return score(scorer, prompts, texts)

    reward.__name__ = name
    return reward


def from_function(spec: str, where: str = "") -> RewardSource:
    fn = load_function(spec, where)
    return RewardSource(name=spec, raw_fn=lambda p, r: fn(
        prompts=p, completions=[[{"role": "assistant", "content": text}] for text in r]))
