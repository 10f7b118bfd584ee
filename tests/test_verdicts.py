"""Verdicts you can trust (issue #34): a stage is never called better on a judge it optimised (its reward
model or reward function, a judge that labelled its pairs, a reward model trained on its pairs); a stage with
no other judge is "not measured independently" in the report and said so by `validate`; a reward model at or
below chance on its own held-out pairs is flagged where its scores are used."""

from __future__ import annotations

import json

import pytest

from alignpipe.eval.independence import independence_line, optimised_judges
from alignpipe.recipe.parse import load_recipe
from alignpipe.report.document import write_report
from alignpipe.report.figures import NOT_INDEPENDENT, NOT_MEASURED
from conftest import tiny_recipe, write_yaml
from test_report import _samples, _stage

RM_WIN = {"rm_win_rate_vs_parent": 0.721, "rm_win_rate_vs_parent_ci": [0.688, 0.756], "reward_stage": "reward"}
HEALTH = {"eot_rate": 1.0, "repetition_rate": 0.0, "distinct_2": 0.5, "mean_response_tokens": 4.0,
          "p95_response_tokens": 6, "eval_status": "complete"}


def run_folder(root, ppo_metrics: dict, rm_accuracy: float = 0.9, **ppo_extra):
    samples = _samples([True] * 8, [0.0] * 8)
    _stage(root, "sft", "sft", dict(HEALTH), samples, lineage=["pretrain"])
    _stage(root, "reward", "reward", {"pairwise_accuracy": rm_accuracy, "eval_pairs": 40}, parent="sft",
           lineage=["pretrain", "sft"])
    _stage(root, "ppo", "ppo", {**HEALTH, **ppo_metrics}, samples, parent="sft", lineage=["pretrain", "sft"],
           **ppo_extra)
    return root


def ppo_rows(text: str) -> list[str]:
    return [line for line in text.split("## Did it help?")[1].split("Response health")[0].splitlines()
            if line.startswith("| **ppo**")]


def test_ppo_is_never_better_on_the_reward_model_it_optimised(tmp_path):
    run = run_folder(tmp_path / "run", {**RM_WIN, "optimised_judges": {"rm": "it optimised reward model `reward`"}})
    text = write_report(run, score_rewards=False)[0].read_text()
    [row] = ppo_rows(text)
    assert "72.1% [68.8%, 75.6%]" in row and NOT_INDEPENDENT in row and "better" not in row
    assert f"`ppo`: {NOT_MEASURED}" in text and "it optimised reward model `reward`" in text


def test_a_manifest_without_the_record_is_still_marked(tmp_path):
    """A run from before `optimised_judges` was written: a stage trained on a reward optimised the one it names."""
    run = run_folder(tmp_path / "run", dict(RM_WIN), resolved_config={"reward_model": "reward"})
    [row] = ppo_rows(write_report(run, score_rewards=False)[0].read_text())
    assert NOT_INDEPENDENT in row and "better" not in row


def test_with_a_verifier_the_verdict_comes_from_it(tmp_path):
    verifier = {"gsm8k_win_rate_vs_parent": 0.8, "gsm8k_win_rate_vs_parent_ci": [0.7, 0.9], "gsm8k_pass_rate": 0.5,
                "gsm8k_total": 8}
    run = run_folder(tmp_path / "run", {**RM_WIN, **verifier,
                                        "optimised_judges": {"rm": "it optimised reward model `reward`"}})
    text = write_report(run, score_rewards=False)[0].read_text()
    rm_row, verifier_row = ppo_rows(text)
    assert NOT_INDEPENDENT in rm_row and "verifier `gsm8k`" in verifier_row and verifier_row.endswith("| better |")
    assert NOT_MEASURED not in text


def test_a_reward_model_below_chance_is_flagged(tmp_path):
    run = run_folder(tmp_path / "run", dict(RM_WIN), rm_accuracy=0.415)  # a judge the stage did not optimise
    text = write_report(run, score_rewards=False)[0].read_text()
    [row] = ppo_rows(text)
    assert "below chance" in row and "better" not in row
    assert "reward model `reward` ranks only 41.5% of its own held-out pairs right" in text
    assert "**At or below chance on its own held-out pairs (41.5%):**" in text.split("## Reward model: reward")[1]
    assert f"`ppo`: {NOT_MEASURED}" in text


def test_samples_without_any_judge_say_so(tmp_path):
    run = tmp_path / "run"
    samples = _samples([True] * 8, [0.0] * 8)
    _stage(run, "sft", "sft", dict(HEALTH), samples)
    _stage(run, "dpo", "dpo", dict(HEALTH), samples, parent="sft", lineage=["sft"])
    text = write_report(run, score_rewards=False)[0].read_text()
    assert "samples but no judge" in text and "parent's samples of the same prompts" not in text
    assert f"`dpo`: {NOT_MEASURED}** (it has no judge)" in text


# --- which judges a stage optimised, from its recipe ---------------------------------------------------------


def user_recipe(tmp_path, **stages) -> object:
    trainer = {"max_steps": 1}
    base = {"sft": {"data": {"path": "chat.jsonl"}, "trainer": trainer},
            "reward": {"from": "sft", "data": {"path": "prefs.jsonl"}, "trainer": trainer}}
    data = {"name": "user", "seed": 0, "runs_dir": str(tmp_path / "runs"), "model": {"path": str(tmp_path / "m")},
            "chat_template": "chatml", "stages": {**base, **stages}}
    return load_recipe(write_yaml(tmp_path / "user.yaml", data))


def test_which_judges_each_stage_optimised(tmp_path):
    gsm8k = {"gsm8k": {"verifier": "alignpipe.eval.verifiers:gsm8k"}}
    local = {"local": {"model": str(tmp_path / "judge")}}
    recipe = user_recipe(
        tmp_path,
        ppo={"kind": "ppo", "from": "sft", "reward_model": "reward", "data": {"path": "prompts.jsonl"}},
        ppo_checked={"kind": "ppo", "from": "sft", "reward_model": "reward", "data": {"path": "prompts.jsonl"},
                     "eval": {"judges": gsm8k}},
        grpo={"kind": "grpo", "from": "sft", "reward_function": "alignpipe.eval.verifiers:gsm8k",
              "data": {"path": "prompts.jsonl"}, "eval": {"judges": gsm8k}},
        dpo={"kind": "dpo", "from": "sft", "reward_model": "reward", "data": {"path": str(tmp_path / "prefs.jsonl")}},
        dpo_other={"kind": "dpo", "from": "sft", "reward_model": "reward", "data": {"path": "other.jsonl"}},
        label={"kind": "label", "from": "sft", "labeller": "judge:local", "data": {"path": "prompts.jsonl"},
               "eval": {"judges": local}},
        dpo_labelled={"kind": "dpo", "from": "sft", "data": {"from": "label"}, "eval": {"judges": local}})
    assert optimised_judges(recipe, "ppo", "reward") == {"rm": "it optimised reward model `reward`"}
    assert set(optimised_judges(recipe, "ppo_checked", "reward")) == {"rm"}  # gsm8k stays independent
    assert optimised_judges(recipe, "grpo", "reward") == {"gsm8k": "it optimised `alignpipe.eval.verifiers:gsm8k` "
                                                                    "as its reward"}
    # the same file, named relative to the recipe and absolutely: the reward model learned this stage's pairs
    assert "trained on the same pairs" in optimised_judges(recipe, "dpo", "reward")["rm"]
    assert optimised_judges(recipe, "dpo_other", "reward") == {}
    assert "labelled (stage `label`)" in optimised_judges(recipe, "dpo_labelled", "reward")["local"]

    line = independence_line(recipe, "ppo")
    assert line.count("\n") == 0 and "stage ppo: no independent judge" in line and "stages.ppo.eval.judges" in line
    assert independence_line(recipe, "ppo_checked") is None and independence_line(recipe, "dpo_other") is None
    assert "it has no judge at all" not in line and independence_line(recipe, "sft") is None  # sft: the baseline


def test_validate_says_when_a_stage_has_no_independent_judge(tmp_path, capsys):
    from alignpipe.pipeline.validate import validate

    stages = {"grpo": {"kind": "grpo", "from": "sft", "reward_function": "alignpipe.data.world:judge_reward",
                       "data": {"embedded": "rl_prompts"}, "trainer": {"max_steps": 1}}}
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages=stages)))
    assert optimised_judges(recipe, "grpo", None) == {
        "judge": "it optimised `alignpipe.data.world:judge_reward` as its reward"}
    capsys.readouterr()
    validate(recipe)
    err = [line for line in capsys.readouterr().err.splitlines() if "independent" in line]
    assert len(err) == 1 and "stage grpo" in err[0] and "not measured independently" in err[0]


@pytest.mark.parametrize("accuracy,flagged", [(0.415, True), (0.5, True), (0.51, False), (None, False)])
def test_below_chance(accuracy, flagged):
    from alignpipe.eval.independence import below_chance

    assert below_chance(accuracy) is flagged


# --- end to end: PPO on user data, judged only by the reward model it optimised, then with a verifier ---------


def test_ppo_on_user_data_judged_only_by_its_reward_model_then_by_a_verifier(tmp_path, capsys):
    from alignpipe.cli import main
    from alignpipe.runfolder.manifests import read_manifest
    from hub_layout import save_tiny_model
    from test_eval_user_data import user_recipe as eval_user_recipe

    data = eval_user_recipe(tmp_path, save_tiny_model(tmp_path / "hub" / "tiny-qwen2"))
    prompts = data["stages"]["sft"]["eval"]["prompts"]
    ev = {"prompts": prompts, "num_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 12}
    del data["stages"]["dpo"]
    rl = tmp_path / "rl.jsonl"
    rl.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 2}?"}) + "\n" for i in range(40)))
    data["stages"]["ppo"] = {"kind": "ppo", "from": "sft", "reward_model": "reward", "data": {"path": str(rl)},
                             "lora": {"r": 4, "alpha": 8}, "eval": ev,
                             "trainer": {"total_updates": 2, "rollout_batch_size": 8, "minibatch_size": 4,
                                         "max_new_tokens": 8}}
    path = write_yaml(tmp_path / "ppo.yaml", data)
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    assert "stage ppo: no independent judge" in capsys.readouterr().err
    assert main(["run", str(path)]) == 0
    runs = tmp_path / "runs" / "user"
    m = read_manifest(runs / "ppo")["metrics"]
    assert m["optimised_judges"] == {"rm": "it optimised reward model `reward`"} and "rm_win_rate_vs_parent" in m
    assert main(["report", str(runs)]) == 0
    text = (runs / "report.md").read_text()
    [row] = ppo_rows(text)
    assert NOT_INDEPENDENT in row and "| better |" not in row and f"`ppo`: {NOT_MEASURED}" in text
    accuracy = read_manifest(runs / "reward")["metrics"]["pairwise_accuracy"]
    assert ("ranks only" in text) == (accuracy <= 0.5)  # a reward model at or below chance: flagged

    # a verifier added: only the evaluation re-runs, and the verdict comes from it
    data["stages"]["ppo"]["eval"]["judges"] = {"gsm8k": {"verifier": "alignpipe.eval.verifiers:gsm8k"}}
    write_yaml(path, data)
    assert main(["eval", str(runs / "ppo")]) == 0
    m = read_manifest(runs / "ppo")["metrics"]
    assert main(["report", str(runs)]) == 0
    text = (runs / "report.md").read_text()
    rm_row, verifier_row = ppo_rows(text)
    lo, hi = m["gsm8k_win_rate_vs_parent_ci"]
    verdict = "better" if lo > 0.5 else "worse" if hi < 0.5 else "no clear difference"
    assert NOT_INDEPENDENT in rm_row and f"| {verdict} |" in verifier_row and NOT_MEASURED not in text
    assert "gsm8k_win_rate_vs_greedy_parent" in m
