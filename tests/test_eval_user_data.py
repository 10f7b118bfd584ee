"""The evaluation on a user's own model and data: a tiny hub-layout model, user-format files
(conversations, pairs, prompts with reference answers), sft -> reward -> dpo. The dpo manifest carries
the same metric names as the embedded world (health, KL, reward-model win rates with intervals, a
verifier's pass rate); the report gives verdicts; a gate on one of them stops the run (exit 2, one line)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.pipeline import gates
from alignpipe.runfolder.manifests import read_manifest
from conftest import write_yaml
from hub_layout import arithmetic

TRAINER = {"per_device_train_batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 0, "logging_steps": 1,
           "max_length": 64}
VERIFIER = {"gsm8k": {"verifier": "alignpipe.eval.verifiers:gsm8k"}}


def write_files(folder: Path) -> dict[str, Path]:
    rows = arithmetic(96)
    files = {"chat": folder / "chat.jsonl", "pairs": folder / "prefs.jsonl", "prompts": folder / "prompts.jsonl"}
    files["chat"].write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                              {"role": "assistant", "content": r}]}) + "\n"
                                     for q, r, _ in rows))
    files["pairs"].write_text("".join(json.dumps({"prompt": q, "chosen": r, "rejected": w}) + "\n" for q, r, w in rows))
    # GSM8K-style: question / answer ending in `#### N`
    held = arithmetic(8, seed=7)
    files["prompts"].write_text("".join(
        json.dumps({"question": q, "answer": f"{r}\n#### {r.split()[-1].rstrip('.')}"}) + "\n" for q, r, _ in held))
    return files


def user_recipe(folder: Path, model_dir: Path, dpo_gates: list[str] | None = None) -> dict:
    files = write_files(folder)
    lora = {"r": 4, "alpha": 8}
    ev = {"prompts": str(files["prompts"]), "num_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 12,
          "judges": VERIFIER}
    return {"name": "user", "seed": 0, "runs_dir": str(folder / "runs"), "model": {"path": str(model_dir)},
            "chat_template": "chatml", "stages": {
                "sft": {"data": {"path": str(files["chat"])}, "lora": lora, "eval": ev,
                        "trainer": {**TRAINER, "max_steps": 6}},
                "reward": {"from": "sft", "data": {"path": str(files["pairs"])}, "lora": lora, "eval_pairs": 16,
                           "trainer": {**TRAINER, "max_steps": 4}},
                "dpo": {"from": "sft", "reward_model": "reward", "data": {"path": str(files["pairs"])}, "lora": lora,
                        "eval": ev, "gates": dpo_gates or [], "trainer": {**TRAINER, "max_steps": 4}}}}


@pytest.fixture(scope="module")
def model_dir(tiny_hub_model) -> Path:
    return tiny_hub_model  # the session's, built once


@pytest.fixture(scope="module")
def user_run(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    path = write_yaml(folder / "user.yaml", user_recipe(folder, model_dir, {"eot_rate": ">= 0"}))
    assert main(["run", str(path)]) == 0
    return folder, path


@pytest.mark.slow
def test_dpo_on_user_data_reports_the_shared_metrics(user_run):
    folder, _ = user_run
    runs = folder / "runs" / "user"
    m = read_manifest(runs / "dpo")["metrics"]
    assert m["eval_status"] == "complete" and m["eval_samples"] == 16
    for key in ("eot_rate", "repetition_rate", "distinct_2"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["mean_response_tokens"] > 0 and math.isfinite(m["kl_to_reference"])
    assert m["reward_stage"] == "reward"
    for key in ("rm_win_rate_vs_parent", "rm_win_rate_vs_sft"):
        lo, hi = m[f"{key}_ci"]
        assert 0.0 <= lo <= m[key] <= hi <= 1.0, key
    assert m["rm_win_rate_vs_sft"] == m["rm_win_rate_vs_parent"]  # sft is the parent
    assert m["gsm8k_total"] == 16 and m["gsm8k_pass_rate"] == m["gsm8k_passed"] / 16
    # the samples file: this stage's responses beside the parent's k-th sample of the same prompt
    rows = [json.loads(x) for x in (runs / "dpo" / "eval_samples.jsonl").read_text().splitlines()]
    sft_rows = [json.loads(x) for x in (runs / "sft" / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["parent_response"] for r in rows] == [r["response"] for r in sft_rows]
    assert all(isinstance(r["gsm8k"], bool) and isinstance(r["reward"], float) for r in rows)
    # sft was evaluated on the same prompts with the same protocol (no parent stage: no comparison)
    s = read_manifest(runs / "sft")["metrics"]
    assert s["gsm8k_total"] == 16 and "kl_to_reference" not in s and "eot_rate" in s
    assert gates.recorded(runs / "dpo")[0]["passed"]  # gates.json beside the manifest
    # the parent sampled greedily: one answer per prompt, the partner of each of dpo's samples, by every judge
    greedy = {r["prompt"]: r["greedy_parent_response"] for r in rows}
    assert len(greedy) == 8 and all(r["greedy_parent_response"] == greedy[r["prompt"]] for r in rows)
    for key in ("rm_win_rate_vs_greedy_parent", "gsm8k_win_rate_vs_greedy_parent"):
        lo, hi = m[f"{key}_ci"]
        assert 0.0 <= lo <= m[key] <= hi <= 1.0, key
    assert "greedy_parent_response" not in sft_rows[0] and m["eval_prompts_cut"] == 0  # sft: no parent


@pytest.mark.slow
def test_report_gives_verdicts_for_user_data(user_run):
    folder, _ = user_run
    assert main(["report", str(folder / "runs" / "user")]) == 0
    text = (folder / "runs" / "user" / "report.md").read_text()
    assert "## Did it help?" in text
    m = read_manifest(folder / "runs" / "user" / "dpo")["metrics"]
    lo, hi = m["rm_win_rate_vs_parent_ci"]
    rows = [r for r in text.splitlines() if r.startswith("| **dpo**")]
    # the reward model learned dpo's own pairs: its row is no evidence whatever its interval
    [rm_row] = [r for r in rows if "reward model `reward`" in r]
    assert f"{m['rm_win_rate_vs_parent']:.1%} [{lo:.1%}, {hi:.1%}]" in rm_row
    assert "optimised on this judge; not independent evidence" in rm_row and "| better |" not in rm_row
    assert m["optimised_judges"] == {"rm": "reward model `reward` was trained on the same pairs as this stage"}
    # the verifier is independent: its verdict stands, beside the one against the parent sampled greedily
    [verifier_row] = [r for r in rows if "verifier `gsm8k`" in r]
    lo, hi = m["gsm8k_win_rate_vs_parent_ci"]
    verdict = "better" if lo > 0.5 else "worse" if hi < 0.5 else "no clear difference"
    glo, ghi = m["gsm8k_win_rate_vs_greedy_parent_ci"]
    greedy = "better" if glo > 0.5 else "worse" if ghi < 0.5 else "no clear difference"
    assert verifier_row.endswith(f"| {verdict} | {m['gsm8k_win_rate_vs_greedy_parent']:.1%} [{glo:.1%}, {ghi:.1%}] | "
                                 f"{greedy} |")
    assert "vs parent greedy" in text and "not measured independently" not in text
    assert "eot_rate" in text or "ends its turn" in text


@pytest.mark.slow
def test_gate_on_a_new_metric_stops_the_run(user_run, capsys):
    folder, path = user_run
    capsys.readouterr()
    code = main(["run", str(path), "--set", "stages.dpo.gates=['rm_win_rate_vs_sft >= 1.01']"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    line = err[-1]
    assert line.startswith("alignpipe: error:") and "rm_win_rate_vs_sft" in line and "1.01" in line
    assert read_manifest(folder / "runs" / "user" / "dpo")["status"] == "complete"


def test_gsm8k_verifier():
    from alignpipe.eval.verifiers import final_number, gsm8k

    row = {"answer": "Natalia sold 48/2 = 24 clips in May.\n#### 1,072"}
    assert final_number(row["answer"]) == 1072
    assert gsm8k("q", "so she sold 1072 clips", row) and gsm8k("q", "work... #### 1072", row)
    assert not gsm8k("q", "It is 1071.", row) and not gsm8k("q", "no number", row)
    assert not gsm8k("q", "1072", {"answer": None})


def test_health_figures():
    from alignpipe.eval.health import distinct_n, health_metrics, loops, percentile

    assert loops([5, 6, 7] * 6) and not loops(list(range(18))) and not loops([1, 1, 1])  # short: never a loop
    assert distinct_n(["a b a b", "a b"], 2) == 2 / 4 and distinct_n(["one"], 2) == 0.0
    assert percentile([1, 2, 3, 4, 100], 95) == 100 and percentile([3], 95) == 3
    m = health_metrics(["x y", "x y z"], [[1, 2], [3, 4, 5] * 5], [True, False])
    assert m["eot_rate"] == 0.5 and m["repetition_rate"] == 0.5 and m["mean_response_tokens"] == 8.5


def test_prompt_rows_from_common_formats():
    from alignpipe.eval.prompts import prompt_row

    assert prompt_row({"question": "q?", "answer": "a #### 3"}) == {
        "prompt": [{"role": "user", "content": "q?"}], "text": "q?", "answer": "a #### 3"}
    conv = prompt_row({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    assert conv["text"] == "hi" and conv["answer"] == "hello" and len(conv["prompt"]) == 1
    assert prompt_row({"turns": ["first", "second"], "reference": ["ref"]})["answer"] == "ref"  # MT-Bench
    assert prompt_row({"instruction": "do", "input": "this", "output": "done"})["text"] == "do\n\nthis"
    assert prompt_row({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}]})["answer"] == "c"
    assert prompt_row({"title": "x"}) is None and prompt_row({"messages": [{"role": "assistant", "content": "a"}]}) is None


@pytest.mark.slow
def test_without_a_prompts_file_a_stage_is_evaluated_on_its_held_out_rows(model_dir, tmp_path):
    recipe = user_recipe(tmp_path, model_dir)
    del recipe["stages"]["sft"]["eval"]["prompts"]
    recipe["stages"] = {"sft": {**recipe["stages"]["sft"], "trainer": {**TRAINER, "max_steps": 1}}}
    path = write_yaml(tmp_path / "heldout.yaml", recipe)
    assert main(["run", str(path)]) == 0
    sft = tmp_path / "runs" / "user" / "sft"
    m = read_manifest(sft)["metrics"]
    # the recipe's held-out split (alignpipe.data.split): every conversation whose first user turn it holds out
    from alignpipe.data.split import prompt_key, recipe_split
    from alignpipe.recipe.parse import load_recipe

    split = recipe_split(load_recipe(path))
    rows = [json.loads(x) for x in (tmp_path / "chat.jsonl").read_text().splitlines()]
    held = {r["messages"][0]["content"] for r in rows if split.is_heldout(prompt_key(r))}
    assert m["eval_status"] == "complete" and m["eval_prompts"] == len(held) > 0
    report = json.loads((sft / "data_report.json").read_text())
    assert report["tokens"]["max_length"] == 64  # the training's data report, not overwritten by the evaluation
    assert {json.loads(x)["prompt"] for x in (sft / "eval_samples.jsonl").read_text().splitlines()} == held
