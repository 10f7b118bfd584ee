"""recipes/ppo-reward.yaml (issue #38, docs/ppo.md): the world it claims, a weaker teacher's demonstrations with a
consistent plausible mistake beside checked preference pairs, and PPO against the DPO likelihood with no entropy term.
Properties of the recipe's data and settings; the figures it quotes come from runs (docs/ppo.md)."""

from __future__ import annotations

from alignpipe.data.world import World, WorldConfig, judge
from alignpipe.recipe.parse import load_recipe
from alignpipe.reward.onpolicy import failure_type
from conftest import REPO

RECIPE = REPO / "recipes" / "ppo-reward.yaml"


def test_the_demonstrations_mostly_teach_a_plausible_wrong_answer_while_every_chosen_answer_is_right():
    recipe = load_recipe(RECIPE)
    world = World(WorldConfig(**{"seed": recipe.seed, **recipe.world}))
    demos = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in world.sft_rows()]
    kinds = [failure_type(reply, True, judge(prompt, reply)) for prompt, reply in demos]
    # more than half of the demonstrations: greedy decoding follows the teacher's mistake
    assert kinds.count("wrong_answer") > len(demos) / 2
    assert set(kinds) == {"pass", "wrong_answer"}  # house style throughout: only the prompt tells them apart
    pairs = world.preference_rows("train")
    assert all(judge(p["prompt"][0]["content"], p["chosen"][0]["content"]) for p in pairs)
    assert not any(judge(p["prompt"][0]["content"], p["rejected"][0]["content"]) for p in pairs)


def test_ppo_optimises_the_dpo_likelihood_with_no_entropy_term():
    recipe = load_recipe(RECIPE)
    ppo = recipe.stages["ppo"]
    assert ppo.implicit_reward == "likelihood"
    assert recipe.stages[ppo.reward_model].kind == "dpo"
    assert ppo.trainer["entropy_coef"] == 0.0
