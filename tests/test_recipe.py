"""Recipes: every shipped recipe loads and validates; bad recipes fail with one clear line (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignpipe.cli import main
from alignpipe.pipeline.validate import validate
from alignpipe.recipe.parse import load_recipe
from conftest import REPO, tiny_recipe, write_yaml

SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_loads_and_validates(path, monkeypatch, tmp_path):
    # validate never reaches the hub: hub models/datasets are checked for form and noted (with
    # HF_HUB_OFFLINE=1 it would refuse those not cached, which on a test machine is all of them)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    text = path.read_text()
    if "data/gsm8k_test.jsonl" in text:  # the real-model recipes evaluate on the user's local GSM8K copy
        path = tmp_path / path.name
        path.write_text(text)
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "gsm8k_test.jsonl").write_text(
            '{"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\\n#### 5"}\n')
    if "data/pretrain/" in text:  # the GPU scaling sweep reads the user's own text folder
        path = tmp_path / path.name
        path.write_text(text)
        (tmp_path / "data" / "pretrain").mkdir(parents=True)
        (tmp_path / "data" / "pretrain" / "a.txt").write_text("Some text.\n\nMore text.\n")
    recipe = load_recipe(path)
    validate(recipe)
    assert recipe.order()[0] in recipe.stages
    # the file starts with the command that runs it
    assert path.read_text().lstrip().startswith("#")


def test_order_puts_parents_first(tiny):
    recipe = load_recipe(tiny)
    assert recipe.order() == ["pretrain", "sft"]
    assert recipe.order(["sft"]) == ["pretrain", "sft"]


def test_overrides_are_typed(tiny):
    recipe = load_recipe(tiny, ["stages.sft.trainer.learning_rate=5e-4", "seed=3"])
    assert recipe.seed == 3
    assert recipe.stages["sft"].trainer["learning_rate"] == 5e-4


def _mutate(recipe: dict, dotted: str, value) -> dict:
    node = recipe
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return recipe


DELETE = object()

BAD = [
    # (what, dotted key to set, value, text the error must contain)
    ("misspelled stage key", "stages.sft.lerning_rate", 1e-3, "stages.sft.lerning_rate"),
    ("misspelled trainer key", "stages.sft.trainer.learnin_rate", 1e-3, "stages.sft.trainer.learnin_rate"),
    ("missing from stage", "stages.sft.from", "pretrian", "stages.sft.from"),
    ("wrong type", "stages.pretrain.block_size", "big", "stages.pretrain.block_size"),
    ("wrong type of seed", "seed", [1], "seed"),
    ("missing data file", "stages.sft.data", {"path": "no/such/file.jsonl"}, "no/such/file.jsonl"),
    ("unknown kind", "stages.sft.kind", "sfx", "stages.sft.kind"),
    ("non-positive lr", "stages.sft.trainer.learning_rate", 0, "stages.sft.trainer.learning_rate"),
    ("non-positive steps", "stages.sft.trainer.max_steps", -5, "stages.sft.trainer.max_steps"),
    ("name escapes runs_dir", "name", "../evil", "name"),
    ("missing name", "name", DELETE, "name"),
    ("unknown top-level key", "seeed", 1, "seeed"),
    ("unknown embedded part", "stages.sft.data", {"embedded": "sfft"}, "stages.sft.data.embedded"),
    ("unknown world key", "world.n_sfft", 3, "world.n_sfft"),
]


@pytest.mark.parametrize("what,key,value,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_is_one_line_exit_2(tmp_path, capsys, what, key, value, expect):
    recipe = _mutate(tiny_recipe(tmp_path / "runs"), key, value)
    path = write_yaml(tmp_path / "bad.yaml", recipe)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and expect in err and "fix:" in err, err
    assert not (tmp_path / "runs").exists()  # nothing written before training


def test_cycle_of_from(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["stages"]["sft2"] = {"kind": "sft", "from": "sft3", "data": {"embedded": "sft"}}
    recipe["stages"]["sft3"] = {"kind": "sft", "from": "sft2", "data": {"embedded": "sft"}}
    path = write_yaml(tmp_path / "cycle.yaml", recipe)
    assert main(["validate", str(path)]) == 2
    assert "cycle" in capsys.readouterr().err


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstages:\n  sft: {from: pretrain\n  other: 1\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:4:" in err and "YAML syntax error" in err


@pytest.mark.slow
def test_cli_error_has_no_traceback(tmp_path):
    recipe = _mutate(tiny_recipe(tmp_path / "runs"), "stages.sft.trainer.learnin_rate", 1e-3)
    path = write_yaml(tmp_path / "bad.yaml", recipe)
    proc = subprocess.run([sys.executable, "-m", "alignpipe.cli", "validate", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "did you mean 'learning_rate'" in proc.stderr


def test_valid_recipe_exit_0(tiny, capsys):
    assert main(["validate", str(tiny)]) == 0
    assert "ok" in capsys.readouterr().out
