"""The stage contract: a kind declared outside alignpipe (here, in this test module) runs in a recipe
like a built-in one, with nothing else to edit; and the registry's facts are what the rest reads."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from alignpipe.cli import main
from alignpipe.recipe.kinds import StageKind, all_kinds, kind_of
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.schema import StageConfig
from alignpipe.runfolder.manifests import read_manifest
from conftest import TINY_EVAL, tiny_recipe, write_yaml

KINDS = all_kinds()  # the registry, the built-in kinds loaded


@dataclass
class CopyConfig(StageConfig):
    teacher: str | None = None  # another stage of the recipe (declared in `references`: an upstream)
    noise: float = 0.0  # added to every weight, so a changed config visibly changes the model


def copy_trainer_config():
    from transformers import TrainingArguments

    return TrainingArguments


def run_copy(ctx) -> dict:
    """Its start, saved as it is (plus `noise`), then evaluated as every policy stage is."""
    from alignpipe.stages.helpers import evaluate_policy, start_as_reference

    tokenizer, model = ctx.load_tokenizer(), ctx.load_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(ctx.config.noise)
    ctx.model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(ctx.model_dir))
    tokenizer.save_pretrained(str(ctx.model_dir))
    metrics = {"copied_parameters": sum(p.numel() for p in model.parameters()),
               "teacher_seen": read_manifest(ctx.stage_dir(ctx.config.teacher))["stage"] if ctx.config.teacher else None}
    metrics.update(evaluate_policy(ctx, model, tokenizer, start_as_reference(ctx, model)))
    return metrics


COPY = StageKind("copy", CopyConfig, run_copy, copy_trainer_config, family="conversations", embedded="sft",
                 references=("teacher",), user_split=True)


@pytest.fixture
def copy_kind(monkeypatch):
    monkeypatch.setitem(KINDS, "copy", COPY)  # registered for this test only
    return COPY


def _recipe(tmp_path, **copy_stage):
    recipe = tiny_recipe(tmp_path / "runs", extra_stages={
        "copy": {"from": "sft", "data": {"embedded": "sft"}, "eval": TINY_EVAL, "teacher": "pretrain", **copy_stage}})
    recipe["stages"]["pretrain"]["trainer"]["max_steps"] = 5
    recipe["stages"]["pretrain"]["eval"] = {"enabled": False}
    recipe["stages"]["sft"]["trainer"]["max_steps"] = 2
    recipe["stages"]["sft"]["eval"] = {"enabled": False}
    return write_yaml(tmp_path / "kinds.yaml", recipe)


@pytest.mark.slow
def test_a_kind_registered_by_a_test_module_runs_in_a_recipe(tmp_path, copy_kind, capsys):
    path = _recipe(tmp_path)
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path)]) == 0
    runs = tmp_path / "runs" / "tiny"
    m = read_manifest(runs / "copy")
    assert m["status"] == "complete" and m["kind"] == "copy"
    assert m["parent"]["stage"] == "sft" and m["lineage"] == ["pretrain", "sft"]
    metrics = m["metrics"]
    assert metrics["teacher_seen"] == "pretrain" and metrics["copied_parameters"] > 0
    # the shared evaluation ran: the embedded world's judge, KL to the start (a copy: 0)
    assert metrics["eval_status"] == "complete" and 0 <= metrics["judge_pass_rate"] <= 1
    assert metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert (runs / "copy" / "eval_samples.jsonl").is_file()
    mine, parent = load_file(runs / "copy" / "model" / "model.safetensors"), \
        load_file(runs / "sft" / "model" / "model.safetensors")
    assert mine.keys() == parent.keys() and all(torch.equal(mine[k], parent[k]) for k in mine)
    # its config is fingerprinted like a built-in's: the same recipe skips it, a changed key re-runs only it
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    assert "stage copy: complete with the same config and inputs, skipped" in capsys.readouterr().err
    assert main(["run", str(_recipe(tmp_path, noise=0.5))]) == 0
    err = capsys.readouterr().err
    assert "stage copy: starting over" in err and "stage sft: complete with the same config" in err
    changed = load_file(runs / "copy" / "model" / "model.safetensors")
    assert all(torch.allclose(changed[k], parent[k] + 0.5) for k in changed)


def test_a_registered_kind_is_checked_by_what_it_declares(tmp_path, copy_kind, capsys):
    # `references`: a stage name that the recipe does not have is refused at parse time
    bad = _recipe(tmp_path, teacher="nope")
    assert main(["validate", str(bad)]) == 2
    assert "stages.copy.teacher" in capsys.readouterr().err
    # `embedded`: another part of the world than the one it declares
    bad = _recipe(tmp_path, data={"embedded": "pairs"})
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stages.copy.data.embedded" in err and "'sft'" in err
    # `references` make the named stage an upstream of it, beside `from`
    recipe = load_recipe(_recipe(tmp_path))
    assert recipe.upstream("copy") == ["sft", "pretrain"]
    assert recipe.order(["copy"]) == ["pretrain", "sft", "copy"]


def test_an_unregistered_kind_is_refused_with_the_known_ones(tmp_path, capsys):
    path = _recipe(tmp_path)  # no fixture: `copy` is not registered here
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown stage kind 'copy'" in err and ", ".join(KINDS) in err


def test_every_builtin_kind_declares_its_facts():
    for name, kind in KINDS.items():
        assert kind.name == name and kind.run.__module__ == kind.config.__module__
        assert isinstance(kind.trainer_config(), type)
    assert [k for k, v in KINDS.items() if not v.chat] == ["pretrain", "scaling"]
    assert kind_of("sft").baseline and kind_of("reward").scorer and kind_of("ppo").trained_on_reward
