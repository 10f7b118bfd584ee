"""GRPO / RLOO through TRL on a tiny model: with the judge as reward (and saying so), with a reward
stage's model, and the recipe checks."""

from __future__ import annotations

import json

import pytest

from alignpipe.errors import RecipeError
from alignpipe.models.loading import load_stage_model
from alignpipe.pipeline.runner import run_recipe
from alignpipe.pipeline.validate import validate
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.schema import ModelSpec
from alignpipe.stages.grpo import missing_eot
from conftest import REPO, copy_base, tiny_recipe, write_yaml

EVAL = {"num_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 12}
TRAINER = {"max_steps": 4, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 12,
           "learning_rate": 1e-3, "logging_steps": 1}
JUDGE = "alignpipe.data.world:judge_reward"


def stage(kind: str = "grpo", **over) -> dict:
    out = {"kind": kind, "from": "sft", "reward_function": JUDGE, "data": {"embedded": "rl_prompts"}, "eval": EVAL,
           "trainer": dict(TRAINER)}
    out.update(over)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("grpo")
    copy_base(tiny_base, root / "runs")  # the session's tiny pretrain + sft
    return root


def run(root, stages: dict, only: list[str]) -> dict:
    return run_recipe(load_recipe(write_yaml(root / "r.yaml", tiny_recipe(root / "runs", extra_stages=stages))), only)


@pytest.mark.slow
def test_grpo_with_the_judge_says_it_trained_on_it(runs, capsys):
    m = run(runs, {"grpo": stage()}, ["grpo"])["grpo"]
    assert m["status"] == "complete"
    metrics = m["metrics"]
    assert metrics["judge_used_for_training"] is True  # its pass rate is no independent measure
    assert "not an independent measure" in capsys.readouterr().out
    assert metrics["global_step"] == 4 and 0 <= metrics["judge_pass_rate"] <= 1
    assert metrics["kl_to_reference"] is not None
    rows = [json.loads(line) for line in (runs / "runs" / "tiny" / "grpo" / "train_log.jsonl").read_text().splitlines()]
    # both reward functions were applied: the judge and the end-of-turn penalty
    assert any("rewards/judge_reward/mean" in r for r in rows) and any("rewards/missing_eot/mean" in r for r in rows)
    assert load_stage_model(runs / "runs" / "tiny" / "grpo", ModelSpec()) is not None


@pytest.mark.slow
def test_rloo_with_a_reward_stage_and_lora(runs):
    stages = {
        "reward": {"from": "sft", "data": {"embedded": "pairs"}, "eval": EVAL,
                   "trainer": {"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-3}},
        "rloo": stage("rloo", reward_function=None, reward_model="reward", lora={"r": 4, "alpha": 8},
                      trainer={**TRAINER, "max_steps": 2}),
    }
    m = run(runs, stages, ["rloo"])["rloo"]
    metrics = m["metrics"]
    assert m["status"] == "complete" and metrics["judge_used_for_training"] is False
    assert metrics["reward_stage"] == "reward" and isinstance(metrics["mean_reward"], float)
    assert isinstance(metrics["reward_hacking_suspected"], bool)
    out = runs / "runs" / "tiny" / "rloo"
    assert (out / "model" / "adapter_config.json").is_file()
    assert load_stage_model(out, ModelSpec()) is not None


def test_missing_eot_penalises_unfinished_completions():
    fn = missing_eot({9})
    assert fn(prompts=[1, 2, 3], completions=[1, 2, 3], completion_ids=[[4, 9], [4, 5], []]) == [0.0, -1.0, -1.0]


def test_each_kind_checks_its_own_trainer_keys(tmp_path):
    def recipe(kind, trainer):
        return load_recipe(write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages={
            "rl": stage(kind, trainer=trainer)})))

    validate(recipe("rloo", {"normalize_advantages": True}))  # an RLOOConfig field
    with pytest.raises(RecipeError, match="normalize_advantages"):
        validate(recipe("grpo", {"normalize_advantages": True}))  # ... which GRPOConfig does not have
    validate(recipe("grpo", {"scale_rewards": "group"}))
    with pytest.raises(RecipeError, match="exactly one reward"):
        validate(load_recipe(write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages={
            "rl": stage(reward_function=None)}))))
    with pytest.raises(RecipeError, match="reward_weights"):
        validate(recipe("grpo", {"reward_weights": [1.0]}))


def test_the_grpo_recipe_validates():
    recipe = load_recipe(REPO / "recipes" / "grpo.yaml")
    validate(recipe)
    assert recipe.stages["grpo"].reward_function == JUDGE
