"""The DPO family's other trainers as stage kinds: kto (trl.KTOTrainer), orpo and cpo / SimPO
(trl.experimental). Each trains for real in a recipe with a reward stage and reports the shared
evaluation; KTO with LoRA keeps one copy of the base weights; LLaMA-Factory's KTO files load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignpipe.cli import main
from alignpipe.data.formats import normalise
from alignpipe.errors import RecipeError
from alignpipe.pipeline.validate import validate
from alignpipe.recipe.parse import load_recipe
from alignpipe.stages import kto
from alignpipe.stages.context import make_context
from conftest import TINY_EVAL, stage_manifest, tiny_recipe, write_yaml

TRAINER = {"max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 0,
           "logging_steps": 2}
PAIRS = {"data": {"embedded": "pairs"}, "eval": TINY_EVAL, "from": "sft"}
STAGES = {
    "reward": {**PAIRS, "trainer": {"max_steps": 5, "per_device_train_batch_size": 8, "logging_steps": 1}},
    "kto": {**PAIRS, "trainer": TRAINER},
    "kto_lora": {**PAIRS, "kind": "kto", "lora": {"r": 4, "alpha": 8}, "trainer": {**TRAINER, "learning_rate": 1e-2}},
    "orpo": {**PAIRS, "trainer": TRAINER},
    "simpo": {**PAIRS, "kind": "cpo", "trainer": {**TRAINER, "loss_type": "simpo", "cpo_alpha": 0.0}},
    "kto_file": {"kind": "kto", "from": "sft", "data": {"path": "kto_demo.json"}, "trainer": {**TRAINER, "max_steps": 3}},
}
POLICY_STAGES = ["kto", "kto_lora", "orpo", "simpo"]


def llamafactory_kto_rows(n: int) -> list:
    """Rows in LLaMA-Factory's KTO format (data/kto_en_demo.json): `messages` ending in the judged
    assistant reply and a boolean `label`; some multi-turn."""
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": f"What is {i} plus 2?"},
                    {"role": "assistant", "content": f"The answer is {i + 2 if i % 2 == 0 else i}."}]
        if i % 3 == 0:
            messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}] + messages
        rows.append({"messages": messages, "label": i % 2 == 0})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefkinds")
    rows = llamafactory_kto_rows(60)
    rows[5]["label"] = "maybe"  # not a boolean: dropped and counted, never trained on
    (root / "kto_demo.json").write_text(json.dumps(rows, indent=2))
    path = write_yaml(root / "tiny.yaml", tiny_recipe(root / "runs", extra_stages=STAGES))
    assert main(["run", str(path)]) == 0
    return path, root / "runs" / "tiny"


@pytest.mark.slow
def test_each_kind_trains_and_reports_the_shared_evaluation(trained):
    path, runs = trained
    sft = load_file(runs / "sft" / "model" / "model.safetensors")
    for stage in POLICY_STAGES:
        m = stage_manifest(runs / stage)
        assert m["status"] == "complete" and m["parent"]["stage"] == "sft", stage
        metrics = m["metrics"]
        assert metrics["global_step"] == STAGES[stage]["trainer"]["max_steps"]
        assert 0.0 <= metrics["judge_pass_rate"] <= 1.0
        assert metrics["reward_stage"] == "reward" and isinstance(metrics["mean_reward"], float)
        assert metrics["kl_to_reference"] > 0.0, stage  # the policy moved away from the sft start
        assert "implicit_reward_chosen" in metrics and "implicit_reward_rejected" in metrics
        assert metrics["train_loss"] < metrics["train_loss_first"], stage
    for stage in ("kto", "orpo", "simpo"):
        weights = load_file(runs / stage / "model" / "model.safetensors")
        assert sum(not torch.equal(sft[k], weights[k]) for k in sft) >= len(sft) // 2
    assert (runs / "kto_lora" / "model" / "adapter_config.json").is_file()
    assert stage_manifest(runs / "simpo")["metrics"]["loss_type"] == "simpo"
    # KTO's implicit reward separates desirable from undesirable held-out rows
    assert stage_manifest(runs / "kto")["metrics"]["implicit_margin"] > 0
    # the report has a row for each
    assert main(["report", str(runs)]) == 0
    report = (runs / "report.md").read_text()
    kinds = {"kto": "kto", "kto_lora": "kto", "orpo": "orpo", "simpo": "cpo"}
    for stage in POLICY_STAGES:  # its row in the policy table, with its KL figure
        kl = stage_manifest(runs / stage)["metrics"]["kl_to_reference"]
        assert f"| **{stage}** | {kinds[stage]} | complete |" in report and f"{kl:.3f}" in report, stage


@pytest.mark.slow
def test_kto_lora_keeps_one_copy_of_the_base_weights(trained):
    path, _ = trained
    recipe = load_recipe(path)
    copies = {}
    for stage in ("kto", "kto_lora"):
        ctx = make_context(recipe, stage)
        trainer, reference = kto.build_trainer(ctx)
        ptrs = {p.data_ptr() for n, p in trainer.model.named_parameters(remove_duplicate=False) if "lora_" not in n}
        for model in (trainer.ref_model, reference):
            if model is not None:
                ptrs |= {p.data_ptr() for p in model.parameters()}
        copies[stage] = len(ptrs) / len({p.data_ptr() for p in ctx.load_model().parameters()})
        if stage == "kto_lora":
            assert trainer.ref_model is None and reference is None
    assert copies == {"kto": 2.0, "kto_lora": 1.0}


@pytest.mark.slow
def test_llamafactory_kto_file_loads_and_trains(trained):
    _, runs = trained
    m = stage_manifest(runs / "kto_file")
    assert m["status"] == "complete" and m["metrics"]["global_step"] == 3
    report = json.loads((runs / "kto_file" / "data_report.json").read_text())
    text = json.dumps(report)
    assert "kto_messages" in text and "wrong_type" in text  # the bad label is counted by reason


def test_llamafactory_kto_rows_normalise_to_unpaired():
    rows = llamafactory_kto_rows(6) + [{"messages": [{"role": "user", "content": "hi"}], "label": True}]
    data = normalise(rows, source="kto.json", family="unpaired")
    assert data.format == "kto_messages" and len(data.rows) == 6
    first, multi = data.rows[1], data.rows[0]
    assert first == {"prompt": [{"role": "user", "content": "What is 1 plus 2?"}],
                     "completion": [{"role": "assistant", "content": "The answer is 1."}], "label": False}
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user"] and multi["label"] is True
    assert data.drops.counts == {"last_turn_not_assistant": 1}
    # pairs are unpaired by the stage: one desirable and one undesirable row each
    pairs = [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    assert [r["label"] for r in normalise(pairs, source="p.jsonl", family="unpaired").rows] == [True, False]


@pytest.mark.parametrize("stage, message", [
    ({"kind": "cpo", "trainer": {"loss_type": "simpo2"}}, "unknown CPO loss type 'simpo2'"),
    ({"kind": "dpo", "trainer": {"loss_type": "kto"}}, "KTO is stage kind kto"),
    ({"kind": "orpo", "trainer": {"loss_typ": "x"}}, "unknown ORPOConfig key 'loss_typ'"),
    ({"kind": "kto", "from": "reward"}, "starts from reward stage 'reward'"),
])
def test_recipe_checks(tmp_path, stage, message):
    stages = {"reward": {"from": "sft", "data": {"embedded": "pairs"}},
              "x": {"from": "sft", "data": {"embedded": "pairs"}, **stage}}
    path = write_yaml(tmp_path / "bad.yaml", tiny_recipe(tmp_path / "runs", extra_stages=stages))
    with pytest.raises(RecipeError, match=message):
        validate(load_recipe(path))


def test_kinds_recipe_shares_the_default_runs():
    """recipes/preference-kinds.yaml writes into runs/default beside the default's dpo (docs/dpo.md compares
    them): its upstream blocks must equal the default's, or running it would start pretrain/sft/reward over."""
    from alignpipe.recipe.parse import to_plain
    from conftest import REPO

    default, kinds = (load_recipe(REPO / "recipes" / f) for f in ("default.yaml", "preference-kinds.yaml"))
    assert kinds.name == default.name
    for attr in ("seed", "runs_dir", "model", "chat_template", "world"):
        assert to_plain(getattr(kinds, attr)) == to_plain(getattr(default, attr)), attr
    for stage in ("pretrain", "sft", "reward"):
        assert to_plain(kinds.stages[stage]) == to_plain(default.stages[stage]), stage
    assert {cfg.kind for name, cfg in kinds.stages.items() if name not in default.stages} == {"kto", "orpo", "cpo"}
    validate(kinds)
