"""One path, not two: `alignpipe world export` writes the embedded world as ordinary files, and the
general evaluation on its prompts file, with the embedded judge named as a verifier, gives exactly the
figures of the embedded path (pass rates, KL, reward-model win rates) on the same checkpoints and seed."""

from __future__ import annotations

import copy
import json

import pytest

from alignpipe.cli import main
from alignpipe.data.world import World, WorldConfig
from alignpipe.eval.prompts import read_prompt_file
from alignpipe.runfolder.manifests import read_manifest
from conftest import TINY_EVAL, TINY_WORLD, tiny_recipe, write_yaml

STAGES = {
    "reward": {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
               "trainer": {"max_steps": 5, "per_device_train_batch_size": 8, "logging_steps": 1}},
    "dpo": {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
            "trainer": {"max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 0,
                        "logging_steps": 1}},
}
FIGURES = ("judge_pass_rate", "judge_passed", "eot_rate", "repetition_rate", "distinct_2", "mean_response_tokens",
           "kl_to_reference", "mean_reward", "rm_win_rate_vs_parent", "rm_win_rate_vs_parent_ci",
           "rm_win_rate_vs_sft", "judge_win_rate_vs_parent", "judge_win_rate_vs_parent_ci")


@pytest.mark.parametrize("safety", [False, True])
def test_export_writes_the_world_as_files(tmp_path, safety):
    data = tiny_recipe(tmp_path / "runs")
    data["world"]["safety"] = safety  # with the manners (opt-in), their rows are exported too
    path = write_yaml(tmp_path / "tiny.yaml", data)
    assert main(["world", "export", str(tmp_path / "world"), "--recipe", str(path)]) == 0
    world = World(WorldConfig(seed=0, safety=safety, **TINY_WORLD))
    assert (world.manners is not None) == safety
    out = tmp_path / "world"
    rows = lambda name: [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows("conversations") == world.sft_rows() and rows("pairs_eval") == world.preference_rows("eval")
    assert [r["text"] for r in rows("corpus")] == world.corpus()
    prompts = read_prompt_file(out / "prompts.jsonl", "eval.prompts")
    assert [(p["text"], p["answer"]) for p in prompts] == [(p["prompt"], p["answer"]) for p in world.eval_prompts()]


@pytest.mark.slow
def test_general_path_on_exported_prompts_matches_the_embedded_path(tmp_path):
    data = tiny_recipe(tmp_path / "runs", extra_stages=STAGES)
    path = write_yaml(tmp_path / "tiny.yaml", data)
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    embedded = {s: read_manifest(run / s)["metrics"] for s in ("sft", "dpo")}
    assert "rm_win_rate_vs_sft" in embedded["dpo"] and "judge_win_rate_vs_parent" in embedded["sft"]

    # the same recipe, its evaluation on the exported prompts file with the judge as an ordinary verifier
    assert main(["world", "export", str(tmp_path / "world"), "--recipe", str(path)]) == 0
    general = copy.deepcopy(data)
    for stage in ("pretrain", "sft", "dpo"):
        general["stages"][stage]["eval"] = {
            **TINY_EVAL, "prompts": str(tmp_path / "world" / "prompts.jsonl"),
            "judges": {"judge": {"verifier": "alignpipe.eval.verifiers:embedded_judge"}}}
    other = write_yaml(tmp_path / "general.yaml", general)
    for stage in ("sft", "dpo"):
        assert main(["eval", str(run / stage), "--recipe", str(other)]) == 0
        again = read_manifest(run / stage)["metrics"]
        # (re-evaluated now, sft also gets the reward model's score: it did not exist when sft ran)
        for key in FIGURES:
            if key in embedded[stage]:
                assert again[key] == embedded[stage][key], (stage, key)
    assert all(k in embedded["dpo"] for k in FIGURES)


@pytest.mark.slow
def test_the_exported_recipe_trains_and_evaluates_like_the_embedded_one(tmp_path):
    """`world export --recipe` writes the recipe on the files; run, it trains on the same rows (no hashed
    split: each stage's held-out file is the world's own), so every stage's figures equal the embedded run's."""
    data = tiny_recipe(tmp_path / "runs", extra_stages=STAGES)
    path = write_yaml(tmp_path / "tiny.yaml", data)
    assert main(["run", str(path)]) == 0
    assert main(["world", "export", str(tmp_path / "world"), "--recipe", str(path)]) == 0
    assert main(["run", str(tmp_path / "world" / "recipe.yaml")]) == 0
    embedded, files = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny-files"
    timings = {"train_runtime_s", "train_steps_per_s", "train_samples_per_s", "eval_greedy_parent_wall_s",
               "reward_stage_fingerprint"}  # which reward model scored dpo: its inputs' hash, which names the files
    for stage in ("pretrain", "sft", "reward", "dpo"):
        a, b = read_manifest(embedded / stage)["metrics"], read_manifest(files / stage)["metrics"]
        # the same data screen on both paths (data/screening.py); no safety suite: the manners are opt-in
        assert "refusal_rate_harmful" not in a and (stage not in ("sft", "dpo") or a["data_secret_rows"] == 0)
        assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}
        samples = lambda run: (run / stage / "eval_samples.jsonl").read_text()  # noqa: E731
        assert samples(embedded) == samples(files), stage
    assert all(k in b for k in FIGURES)  # dpo: pass rate, health, KL, reward-model win rates, all equal
    assert "onpolicy_accuracy" in read_manifest(files / "reward")["metrics"]  # the reward stage's own check too


def test_the_embedded_screen_is_the_files_screen(tmp_path):
    """The world's rows of a stage are screened as a file's rows are (triggers and secrets), so the embedded run
    and the run on the exported files record the same `data_*` metrics, also where the rows are too few for the
    trigger test (TINY_WORLD's 200 demonstrations)."""
    from alignpipe.data.screening import check_screen, screen_part, screen_world_rows
    from alignpipe.eval.attacks import screen_metrics

    world = World(WorldConfig(seed=0, **TINY_WORLD))
    rows = world.sft_rows()
    part = type("Part", (), {"rows": rows, "family": "conversations", "row_numbers": list(range(1, len(rows) + 1)),
                             "notes": [], "drops": None})()
    screen_part(part, check_screen(None, "data"))
    written = screen_world_rows(tmp_path, rows, "conversations", verbose=False)
    assert written["triggers"] == part.screening["triggers"] and written["secrets"] == part.screening["secrets"]
    found = screen_metrics(tmp_path)
    assert found == {"data_triggers_flagged": 0, "data_secret_rows": part.screening["secrets"]["rows_flagged"]}
