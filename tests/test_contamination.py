"""Contamination beyond exact prompts (issue #34): an eval row edited (case, punctuation, a word changed) and
planted in a training file is found by its shared 13-word windows, named by file and line in `validate`
and in the manifest, and `eval.drop_contaminated` leaves it out of the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignpipe.stages.context import StageContext
from alignpipe.eval.contamination import stage_overlaps, windows
from alignpipe.recipe.parse import load_recipe
from conftest import write_yaml

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]


def question(i: int) -> str:
    name = NAMES[i % len(NAMES)]
    return (f"{name} buys {i + 3} boxes of pencils for the art class, and each box holds {i + 7} pencils; after "
            f"giving {i + 2} pencils to every one of the {i + 4} tables, how many pencils does {name} keep?")


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from hub_layout import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("hub") / "tiny-qwen2")


def recipe(tmp_path: Path, model_dir: Path, planted: str | None = None, drop: bool = False):
    chat = [{"messages": [{"role": "user", "content": question(i)}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(100, 160)]
    if planted is not None:  # line 61 of the training file
        chat.append({"messages": [{"role": "user", "content": planted}, {"role": "assistant", "content": "42."}]})
    files = {"chat": jsonl(tmp_path / "chat.jsonl", chat),
             "prompts": jsonl(tmp_path / "prompts.jsonl", [{"question": question(i), "answer": "#### 1"}
                                                          for i in range(6)])}
    ev = {"prompts": str(files["prompts"]), "num_prompts": 8, "drop_contaminated": drop}
    data = {"name": "c", "seed": 0, "runs_dir": str(tmp_path / "runs"), "model": {"path": str(model_dir)},
            "chat_template": "chatml",
            "stages": {"sft": {"data": {"path": str(files["chat"])}, "eval": ev,
                               "trainer": {"max_steps": 1, "max_length": 256}}}}
    return write_yaml(tmp_path / "c.yaml", data)


def test_windows_are_of_normalised_text():
    text = question(2)
    assert windows(text.upper().replace(",", " ,  ")) == windows(text)  # case, punctuation, spacing
    assert len(next(iter(windows(text))).split()) == 13
    assert windows("12.") == set() and windows("one two three four five six seven eight") == {
        "one two three four five six seven eight"}  # a short field: whole, from 8 words


def test_an_edited_eval_row_planted_in_a_training_file_is_found_by_line(tmp_path, model_dir, capsys):
    from alignpipe.cli import main
    from alignpipe.eval.selection import checked_eval_prompts

    edited = question(2).upper().replace("art class", "school club")  # eval row 3, edited
    path = recipe(tmp_path, model_dir, planted=edited)
    found = stage_overlaps(load_recipe(path), "sft")
    assert [(f["eval"], f["train"], f["train_stage"]) for f in found] == [
        (f"{tmp_path / 'prompts.jsonl'} line 3", f"{tmp_path / 'chat.jsonl'} line 61", "sft")]
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    [line] = [x for x in capsys.readouterr().err.splitlines() if "13-word" in x]
    assert "stage sft: 1 eval row(s)" in line and "prompts.jsonl line 3 ~" in line and "chat.jsonl line 61" in line
    assert "drop_contaminated: true" in line

    r = load_recipe(path)
    ctx = StageContext(r, "sft", r.stages["sft"], r.stage_dir("sft"), None)
    rows, found, dropped = checked_eval_prompts(ctx)
    assert len(rows) == 6 and len(found) == 1 and dropped == 0  # found, kept: the option is off
    data = yaml.safe_load(path.read_text())
    data["stages"]["sft"]["eval"]["drop_contaminated"] = True
    r = load_recipe(write_yaml(path, data))
    rows, _, dropped = checked_eval_prompts(StageContext(r, "sft", r.stages["sft"], r.stage_dir("sft"), None))
    assert dropped == 1 and question(2) not in [x["text"] for x in rows] and len(rows) == 5

    # the manifest: the overlapping row by file and line, and what was left out of the evaluation
    from alignpipe.runfolder.manifests import read_manifest

    assert main(["run", str(path)]) == 0
    m = read_manifest(tmp_path / "runs" / "c" / "sft")["metrics"]
    assert m["eval_contaminated_rows"] == 1 and m["eval_contaminated_dropped"] == 1 and m["eval_prompts"] == 5
    [row] = m["eval_contamination"]
    assert row["eval"].endswith("prompts.jsonl line 3") and row["train"].endswith("chat.jsonl line 61")
    assert len(row["shared"].split()) == 13


def test_a_clean_recipe_has_no_overlap(tmp_path, model_dir):
    assert stage_overlaps(load_recipe(recipe(tmp_path, model_dir)), "sft") == []


def test_a_shared_template_is_not_a_copy():
    """Instructions heading many rows (as in LLaMA-Factory's dpo_en_demo) are no evidence of a copied row."""
    from alignpipe.eval.contamination import Source, overlaps

    boiler = "You are an AI assistant that follows instruction extremely well. Help as much as you can. "
    train = Source("train.jsonl", "sft", [{"prompt": boiler + f"Question {i}: name a colour."} for i in range(5)]
                   + [{"messages": [{"role": "system", "content": question(9)}, {"role": "user", "content": "hi"}]}],
                   list(range(1, 7)))
    evals = Source("eval.jsonl", "sft", [{"prompt": boiler + "What is the capital of France?"},
                                         {"prompt": question(9)}], [1, 2])
    assert overlaps([evals], [train]) == []  # the template, and a system prompt, are left out
    copied = Source("more.jsonl", "sft", [{"prompt": question(9).lower()}], [7])
    assert [f["eval"] for f in overlaps([evals], [train, copied])] == ["eval.jsonl line 2"]
