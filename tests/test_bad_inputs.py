"""Bad input never becomes a traceback or a damaged run folder.

Every case runs `alignpipe run` beside one complete tiny run folder (built once for the module) and
checks: exit code 2, one line on stderr naming the file/key/line and a fix, and the complete run
folder byte-for-byte unchanged. Recipe parsing details are covered in test_recipe.py (`validate`
on a fresh folder); here the point is what `run` does next to work that must survive.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from alignpipe.cli import main
from conftest import tiny_recipe, write_yaml

pytestmark = pytest.mark.slow  # every test here trains a model


NAME = "shared"  # the recipe name of the complete run every case runs beside


def base_recipe(runs_dir: Path) -> dict:
    """The tiny pretrain -> sft recipe with evaluation off (the folder only has to be complete)."""
    recipe = tiny_recipe(runs_dir, name=NAME)
    for stage in recipe["stages"].values():
        stage["eval"] = {"enabled": False}
    recipe["stages"]["pretrain"]["trainer"]["max_steps"] = 20
    recipe["stages"]["sft"]["trainer"]["max_steps"] = 4
    return recipe


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A folder holding `runs/shared/{pretrain,sft}` (complete) and the recipe that made them."""
    root = tmp_path_factory.mktemp("bad_inputs")
    path = write_yaml(root / "shared.yaml", base_recipe(root / "runs"))
    assert main(["run", str(path)]) == 0
    return root


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder`: bytes hash, size and mode."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_dir():
            out[rel] = ("dir", p.stat().st_mode)
        else:
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size, p.stat().st_mode)
    return out


def _set(recipe: dict, dotted: str, value) -> None:
    node = recipe
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path.name


def _conv(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# --- the cases: each builds its recipe in `d` (a fresh folder) beside the shared runs ---------------
# A case returns (recipe path, texts the one-line error must contain, folder that must stay unchanged).


def _recipe(d: Path, shared: Path, **changes) -> dict:
    recipe = base_recipe(shared / "runs")
    for dotted, value in changes.items():
        _set(recipe, dotted.replace("__", "."), value)
    return recipe


def case_yaml_syntax(d, shared):
    path = d / "broken.yaml"
    path.write_text((shared / "shared.yaml").read_text().replace("stages:", "stages: {", 1))
    return path, ["YAML syntax error", f"{path}:"], None


def case_unknown_key(d, shared):
    return _recipe(d, shared, stages__sft__lerning_rate=1e-3), ["stages.sft.lerning_rate", "unknown key"], None


def case_wrong_type(d, shared):
    return _recipe(d, shared, stages__pretrain__block_size="big"), ["stages.pretrain.block_size", "expected int"], None


def case_missing_required_key(d, shared):
    return _recipe(d, shared, stages=DELETE), ["stages", "missing required key", "add `stages:`"], None


def case_unknown_stage_kind(d, shared):
    return _recipe(d, shared, stages__sft__kind="sfx"), ["stages.sft.kind", "unknown stage kind 'sfx'"], None


def case_from_missing_stage(d, shared):
    return _recipe(d, shared, stages__sft__from="pretrian"), ["stages.sft.from", "'pretrian'"], None


def case_from_cycle(d, shared):
    recipe = _recipe(d, shared)
    recipe["stages"]["a"] = {"kind": "sft", "from": "b", "data": {"embedded": "sft"}}
    recipe["stages"]["b"] = {"kind": "sft", "from": "a", "data": {"embedded": "sft"}}
    return recipe, ["cycle", "a -> b -> a"], None


def case_data_file_missing(d, shared):
    return _recipe(d, shared, stages__sft__data={"path": "no/such.jsonl"}), ["no/such.jsonl", "no such file"], None


def case_malformed_jsonl_line(d, shared):
    name = _jsonl(d / "conv.jsonl", [_conv("q1", "a1"), _conv("q2", "a2"), '{"messages": [', _conv("q4", "a4")])
    return _recipe(d, shared, stages__sft__data={"path": name}), ["conv.jsonl", "line 3", "invalid JSON"], None


def case_row_missing_field(d, shared):
    # every row lacks `rejected`: nothing usable is left, and the message names the first such line
    name = _jsonl(d / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "yes"} for i in range(3)])
    recipe = _recipe(d, shared)
    recipe["stages"]["dpo"] = {"from": "sft", "data": {"path": name, "format": "preference"}}
    return recipe, ["pairs.jsonl", "no usable rows", "no 'rejected' field", "first at 1"], None


def case_empty_after_filtering(d, shared):
    name = _jsonl(d / "conv.jsonl", [_conv(f"q{i}", "   ") for i in range(4)])
    return _recipe(d, shared, stages__sft__data={"path": name}), ["conv.jsonl", "no usable rows", "empty"], None


def case_chosen_identical_to_rejected(d, shared):
    name = _jsonl(d / "pairs.jsonl", [_pair(f"q{i}", "same", "same") for i in range(3)])
    recipe = _recipe(d, shared)
    recipe["stages"]["dpo"] = {"from": "sft", "data": {"path": name}}
    return recipe, ["pairs.jsonl", "identical"], None


def case_template_without_generation_markers(d, shared):
    (d / "plain.jinja").write_text("{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}")
    return _recipe(d, shared, chat_template="plain.jinja"), ["chat_template", "generation"], None


def case_template_end_of_turn_not_a_token_of_the_model(d, shared):
    # a model trained with the embedded template's tokens, fine-tuned under chatml: <|im_end|> is no token of it
    # (no parent stage here: a parent with another template or vocabulary is refused in the cases below and
    # in test_templates.py)
    recipe = _recipe(d, shared, name="mismatch", chat_template="chatml",
                     model={"path": str(shared / "runs" / NAME / "pretrain" / "model")})
    del recipe["stages"]["pretrain"], recipe["stages"]["sft"]["from"]
    return recipe, ["chat_template", "im_end"], None


def case_parent_trained_with_another_template(d, shared):
    # a copy of the run whose pretrain folder says it was trained with another template
    recipe = _recipe(d, shared, name="retemplated")
    shutil.copytree(shared / "runs" / NAME, shared / "runs" / "retemplated", dirs_exist_ok=True)
    saved = shared / "runs" / "retemplated" / "pretrain" / "model" / "chat_template.jinja"
    saved.write_text(saved.read_text().replace("<|user|>", "<|user|> "))
    recipe["stages"]["sft"]["trainer"]["max_steps"] = 5  # sft must re-run, so it meets its parent
    return recipe, ["pretrain", "chat_template"], shared / "runs" / "retemplated"


def case_lora_targets_match_nothing(d, shared):
    recipe = _recipe(d, shared, stages__sft__lora={"target_modules": ["q_proj", "q_prj"]})
    return recipe, ["stages.sft.lora.target_modules", "'q_prj'", "q_proj"], None


def case_misspelled_trainer_key(d, shared):
    recipe = _recipe(d, shared, stages__sft__trainer__learnin_rate=1e-3)
    return recipe, ["stages.sft.trainer.learnin_rate", "did you mean 'learning_rate'"], None


def case_zero_learning_rate(d, shared):
    return _recipe(d, shared, stages__sft__trainer__learning_rate=0), ["stages.sft.trainer.learning_rate"], None


def case_negative_steps(d, shared):
    return _recipe(d, shared, stages__sft__trainer__max_steps=-3), ["stages.sft.trainer.max_steps"], None


def case_negative_checkpoint_every(d, shared):
    return _recipe(d, shared, stages__sft__checkpoint_every=-1), ["stages.sft.checkpoint_every"], None


def case_runs_dir_not_writable(d, shared):
    # a regular file where a folder must go: fails for root too (a chmod'ed folder does not stop root)
    (d / "a-file").write_text("")
    return _recipe(d, shared, runs_dir=str(d / "a-file" / "runs")), ["runs_dir", "a-file"], None


def case_name_escapes_runs_dir(d, shared):
    return _recipe(d, shared, name="../" + NAME), ["name", "'../shared'"], None


def case_stage_name_escapes_runs_dir(d, shared):
    recipe = _recipe(d, shared)
    recipe["stages"]["../sft"] = recipe["stages"].pop("sft")
    return recipe, ["stages.../sft", "not a plain folder name"], None


def case_hub_model_while_offline(d, shared):
    recipe = _recipe(d, shared, name="hubmodel", model={"path": "nobody-here/no-such-model"})
    del recipe["stages"]["pretrain"], recipe["stages"]["sft"]["from"]
    return recipe, ["nobody-here/no-such-model", "HF_HUB_OFFLINE"], None


def case_hub_data_while_offline(d, shared):
    recipe = _recipe(d, shared, stages__sft__data={"hub": "nobody-here/no-such-data"})
    return recipe, ["nobody-here/no-such-data", "HF_HUB_OFFLINE"], None


def case_incompatible_run_folder(d, shared):
    # a copy of the complete run, whose sft manifest says another alignpipe wrote it
    copy_root = shared / "runs" / "oldversion"
    shutil.copytree(shared / "runs" / NAME, copy_root, dirs_exist_ok=True)
    manifest = json.loads((copy_root / "sft" / "manifest.json").read_text())
    manifest["schema"] = 0
    (copy_root / "sft" / "manifest.json").write_text(json.dumps(manifest))
    return _recipe(d, shared, name="oldversion"), ["sft/manifest.json", "incompatible", "--force"], copy_root


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_leaves_runs_untouched(case, shared, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe, expected, keep = CASES[case](tmp_path, shared)
    path = recipe if isinstance(recipe, Path) else write_yaml(tmp_path / "recipe.yaml", recipe)
    keep = keep or shared / "runs" / NAME
    before = snapshot(keep)
    capsys.readouterr()

    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("[alignpipe]")]  # progress lines
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("alignpipe: error: ") and "fix:" in line, line
    assert str(path) in line or str(keep) in line or str(shared) in line, line  # names a file
    for text in expected:
        assert text in line, f"{text!r} not in: {line}"
    assert snapshot(keep) == before
    assert not list(shared.rglob(".alignpipe.lock"))  # the lock was released


def test_shared_recipe_is_still_complete(shared, capsys):
    """The control: the unmodified recipe is skipped as complete (so the cases above differ by one input)."""
    capsys.readouterr()
    assert main(["run", str(shared / "shared.yaml")]) == 0
    assert capsys.readouterr().err.count("skipped") == 2

