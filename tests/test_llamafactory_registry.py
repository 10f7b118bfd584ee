"""LLaMA-Factory's dataset registry (`data: {dataset: NAME, dataset_dir: DIR}`) on a data folder written here in
LLaMA-Factory's shape (its dataset_info.json fields: file_name, formatting, ranking, columns, tags, kto_tag), and
the recipe rules a LLaMA-Factory user meets first: `dataset_dir:` once per recipe, `x-` blocks for YAML anchors,
one rule for relative paths. Pure: no model is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignpipe.cli import main
from alignpipe.data.formats import DataError
from alignpipe.data.sources import prepare_data
from alignpipe.errors import RecipeError
from alignpipe.recipe.parse import load_recipe

ALPACA = [{"instruction": f"Say {i}", "input": "" if i % 2 else "loudly", "output": f"{i}!"} for i in range(6)]
SHAREGPT_PAIRS = [{"conversations": [{"from": "human", "value": f"Pick {i}"}],
                   "chosen": {"from": "gpt", "value": f"{i}"}, "rejected": {"from": "gpt", "value": "no"}}
                  for i in range(5)]
ALPACA_PAIRS = [{"question": f"Add {i} and 1", "chosen": f"{i + 1}", "rejected": "7"} for i in range(5)]
KTO = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}],
        "label": i % 2 == 0} for i in range(4)]
TEXT = [{"text": f"document {i}"} for i in range(3)]
INFO = {
    "alpaca_demo": {"file_name": "alpaca_demo.json"},
    "dpo_demo": {"file_name": "dpo_demo.json", "ranking": True, "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "alpaca_pairs": {"file_name": "alpaca_pairs.json", "ranking": True,
                     "columns": {"prompt": "question", "chosen": "chosen", "rejected": "rejected"}},
    "kto_demo": {"file_name": "kto_demo.json", "formatting": "sharegpt",
                 "columns": {"messages": "messages", "kto_tag": "label"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    "hub_only": {"hf_hub_url": "someone/some_data", "split": "train"},
    "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"}},
}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A LLaMA-Factory `data/` folder: dataset_info.json and its files (JSON arrays, one JSON Lines file)."""
    d = tmp_path / "LLaMA-Factory" / "data"
    d.mkdir(parents=True)
    (d / "dataset_info.json").write_text(json.dumps(INFO, indent=2))
    for name, rows in [("alpaca_demo", ALPACA), ("dpo_demo", SHAREGPT_PAIRS), ("alpaca_pairs", ALPACA_PAIRS),
                       ("kto_demo", KTO)]:
        (d / f"{name}.json").write_text(json.dumps(rows))
    (d / "c4_demo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    return d


def read(data_dir: Path, name: str, family: str):
    return prepare_data({"dataset": name, "dataset_dir": str(data_dir)}, data_dir.parent, family)


def test_alpaca_entry_reads_instruction_input_output(data_dir):
    data = read(data_dir, "alpaca_demo", "conversations")
    assert data.parts[0].format == "alpaca" and len(data.rows) == 6
    assert data.rows[0]["messages"] == [{"role": "user", "content": "Say 0\n\nloudly"},
                                        {"role": "assistant", "content": "0!"}]


def test_sharegpt_ranking_entry_reads_pairs(data_dir):
    data = read(data_dir, "dpo_demo", "pairs")
    assert data.parts[0].format == "sharegpt_preference" and len(data.rows) == 5
    assert data.rows[1]["prompt"] == [{"role": "user", "content": "Pick 1"}]
    assert data.rows[1]["chosen"] == [{"role": "assistant", "content": "1"}]


def test_alpaca_ranking_entry_with_a_renamed_prompt_column(data_dir):
    data = read(data_dir, "alpaca_pairs", "pairs")
    assert data.parts[0].format == "alpaca_preference"
    assert data.rows[2]["prompt"] == [{"role": "user", "content": "Add 2 and 1"}]
    assert data.rows[2]["chosen"][0]["content"] == "3"


def test_kto_tag_and_tags_read_as_labelled_messages(data_dir):
    data = read(data_dir, "kto_demo", "kto")
    assert [r["label"] for r in data.rows] == [True, False, True, False]
    assert data.rows[0]["completion"] == [{"role": "assistant", "content": "Hello 0"}]


def test_pretraining_entry_reads_its_prompt_column_as_text(data_dir):
    data = read(data_dir, "c4_demo", "text")
    assert [r["text"] for r in data.rows] == ["document 0", "document 1", "document 2"]


def test_a_missing_entry_is_one_line_naming_the_registry_and_its_entries(data_dir):
    with pytest.raises(DataError) as e:
        read(data_dir, "alpaca_en_demo", "conversations")
    assert "dataset_info.json" in e.value.file and "has no entry 'alpaca_en_demo'" in e.value.what
    assert "did you mean alpaca_demo" in e.value.fix


def test_multimodal_and_other_hubs_are_refused_by_name(data_dir):
    with pytest.raises(DataError, match="images"):
        read(data_dir, "mllm_demo", "conversations")


def test_path_at_a_registry_folder_says_to_name_an_entry(data_dir):
    # today: datasets' raw "is neither a Dataset directory nor a DatasetDict directory" traceback
    with pytest.raises(DataError) as e:
        prepare_data({"path": str(data_dir)}, data_dir, "conversations")
    assert "LLaMA-Factory data folder" in e.value.what and "dataset:" in e.value.fix


def write_recipe(folder: Path, data: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_dataset_dir_once_per_recipe_relative_to_the_recipe(data_dir, tmp_path, monkeypatch):
    recipes = tmp_path / "LLaMA-Factory" / "recipes"
    recipes.mkdir()
    path = write_recipe(recipes, {"name": "lf", "model": {"init": {}}, "dataset_dir": "../data", "stages": {
        "sft": {"kind": "sft", "data": {"dataset": "alpaca_demo"}},
        "dpo": {"from": "sft", "data": {"mixture": [{"dataset": "dpo_demo", "weight": 1},
                                                    {"dataset": "alpaca_pairs", "weight": 1}]}}}})
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    recipe = load_recipe(path)
    assert recipe.stages["sft"].data == {"dataset": "alpaca_demo", "dataset_dir": "../data"}
    sft = prepare_data(recipe.stages["sft"].data, recipes, "conversations")
    dpo = prepare_data(recipe.stages["dpo"].data, recipes, "pairs")
    assert len(sft.rows) == 6 and len(dpo.rows) == 10


def test_x_keys_hold_blocks_for_yaml_anchors(tmp_path):
    # today: "unknown key 'x-train'"
    path = tmp_path / "recipe.yaml"
    path.write_text("name: anchors\nx-train: &train {max_steps: 3, learning_rate: 1.0e-3}\n"
                    "stages:\n  sft: {data: {embedded: sft}, trainer: *train}\n")
    recipe = load_recipe(path)
    assert recipe.stages["sft"].trainer == {"max_steps": 3, "learning_rate": 1.0e-3}
    path.write_text("name: anchors\nblocks: 1\nstages:\n  sft: {data: {embedded: sft}}\n")
    with pytest.raises(RecipeError, match="x-NAME"):
        load_recipe(path)


def test_model_path_is_read_from_the_recipes_folder(tmp_path, monkeypatch):
    # today: read from the working folder, so `model.path: ../tiny` named another folder than data paths did
    (tmp_path / "tiny").mkdir()
    (tmp_path / "project").mkdir()
    path = write_recipe(tmp_path / "project", {"name": "m", "model": {"path": "../tiny"},
                                               "stages": {"sft": {"data": {"embedded": "sft"}}}})
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(path)
    assert Path(recipe.model_source).resolve() == (tmp_path / "tiny").resolve()
    assert recipe.model.path == "../tiny"  # the manifest and the fingerprint keep it as written


def test_a_model_path_found_only_from_the_working_folder_is_used_with_a_note(tmp_path, monkeypatch, capsys):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    path = write_recipe(tmp_path / "recipes", {"name": "m", "model": {"path": "models/tiny"},
                                               "stages": {"sft": {"data": {"embedded": "sft"}}}})
    monkeypatch.chdir(tmp_path)
    assert Path(load_recipe(path).model_source) == (tmp_path / "models" / "tiny").resolve()
    assert "read from the working folder" in capsys.readouterr().err


def test_data_command_lists_a_registry(data_dir, capsys):
    assert main(["data", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "7 entries" in out
    line = next(x for x in out.splitlines() if x.split()[:1] == ["dpo_demo"])
    assert "sharegpt" in line and "pairs" in line
    assert "1 hub datasets (downloaded when a stage runs): hub_only" in out
    assert "1 file missing here: mllm_demo" in out


def test_data_command_reads_one_entry(data_dir, capsys):
    assert main(["data", str(data_dir), "--dataset", "kto_demo"]) == 0
    out = capsys.readouterr().out
    assert "4 read" in out or "4 rows" in out


def test_a_dataset_dir_without_a_registry_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(DataError) as e:
        prepare_data({"dataset": "x", "dataset_dir": "nowhere"}, tmp_path, "conversations", key="stages.sft.data")
    assert e.value.where == "stages.sft.data.dataset_dir" and "read from the recipe's folder" in e.value.what
