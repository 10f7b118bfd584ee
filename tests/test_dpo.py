"""DPO on a tiny model: full and LoRA runs train for real and report the shared metrics, the LoRA
reference is the adapter switched off (one copy of the base weights), the implicit reward learns to
rank the training pairs, and the recipe checks catch bad loss settings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignpipe.cli import main
from alignpipe.errors import RecipeError
from alignpipe.pipeline.validate import validate
from alignpipe.recipe.parse import load_recipe, to_plain
from alignpipe.rl.policy import AdapterOff
from alignpipe.stages import dpo
from alignpipe.stages.context import make_context
from conftest import REPO, TINY_EVAL, copy_base, stage_manifest, tiny_recipe, write_yaml

TRAINER = {"max_steps": 25, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 0,
           "logging_steps": 1, "beta": 0.1}
STAGES = {
    # a reward stage, only to check that DPO reports its score beside the judge's
    "reward": {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
               "trainer": {"max_steps": 5, "per_device_train_batch_size": 8, "logging_steps": 1}},
    "dpo": {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
            "trainer": {**TRAINER, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}},
    "dpo_lora": {"kind": "dpo", "from": "sft", "reward_model": "reward", "data": {"embedded": "pairs"},
                 "eval": TINY_EVAL, "lora": {"r": 4, "alpha": 8}, "trainer": {**TRAINER, "learning_rate": 1e-2}},
    # a second loss variant beside them: IPO alone (the stage's default loss weights must not leak into it)
    "dpo_ipo": {"kind": "dpo", "from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
                "trainer": {**TRAINER, "max_steps": 5, "loss_type": "ipo"}},
}
DPO_STAGES = [name for name in STAGES if name != "reward"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base):
    """The session's tiny pretrain -> sft, then reward and three dpo stages, run once for the whole module."""
    root = tmp_path_factory.mktemp("dpo")
    copy_base(tiny_base, root / "runs")
    path = write_yaml(root / "tiny.yaml", tiny_recipe(root / "runs", extra_stages=STAGES))
    assert main(["run", str(path)]) == 0
    return path, root / "runs" / "tiny"


@pytest.mark.slow
def test_full_and_lora_dpo_train_and_report(trained):
    _, runs = trained
    sft_weights = load_file(runs / "sft" / "model" / "model.safetensors")
    for stage in DPO_STAGES:
        m = stage_manifest(runs / stage)
        assert m["status"] == "complete" and m["parent"]["stage"] == "sft"
        metrics = m["metrics"]
        for key in ("judge_pass_rate", "kl_to_reference", "mean_reward", "implicit_accuracy", "implicit_margin",
                    "implicit_reward_chosen", "implicit_reward_rejected", "train_implicit_accuracy"):
            assert key in metrics, (stage, key)
        assert 0.0 <= metrics["judge_pass_rate"] <= 1.0
        assert metrics["global_step"] == STAGES[stage]["trainer"]["max_steps"]
        # the policy moved away from its reference, and the KL estimate sees it
        assert metrics["kl_to_reference"] > 0.0

    # full DPO rewrote the SFT weights; LoRA saved only an adapter, which reloads over the sft base
    full = load_file(runs / "dpo" / "model" / "model.safetensors")
    assert sum(not torch.equal(sft_weights[k], full[k]) for k in sft_weights) >= len(sft_weights) // 2
    assert (runs / "dpo_lora" / "model" / "adapter_config.json").is_file()
    assert not (runs / "dpo_lora" / "model" / "model.safetensors").exists()
    # the base is named relative to the run folder (by stage and manifest hash), so the folder can move
    assert stage_manifest(runs / "dpo_lora")["base_model"] == {
        "stage": "sft", "manifest_sha256": stage_manifest(runs / "dpo_lora")["parent"]["manifest_sha256"]}
    assert stage_manifest(runs / "dpo_ipo")["metrics"]["loss_type"] == ["ipo"]
    # the named reward stage scored its samples; it is fingerprinted by its own inputs (it may be built beside)
    assert stage_manifest(runs / "dpo_lora")["metrics"]["reward_stage"] == "reward"
    assert stage_manifest(runs / "dpo_lora")["inputs"]["evaluated_with:reward"] == stage_manifest(runs / "reward")[
        "fingerprint"]
    assert stage_manifest(runs / "dpo_lora")["metrics"]["loss_type"] == list(dpo.DEFAULT_LOSS_TYPE)


@pytest.mark.slow
def test_implicit_accuracy_on_training_pairs_rises(trained):
    _, runs = trained
    for stage in ("dpo", "dpo_lora"):
        log = [json.loads(line) for line in (runs / stage / "train_log.jsonl").read_text().splitlines()]
        first = next(row for row in log if "rewards/margins" in row)
        metrics = stage_manifest(runs / stage)["metrics"]
        # at step 1 policy == reference, so every implicit reward is 0 up to float rounding (the reference's
        # log-probs come from another forward; on some CPU kernels they differ in the last bits, so which pairs
        # count as "ranked right" at step 1 is noise, and only the size of the rewards is asserted)
        assert abs(first["rewards/margins"]) < 1e-3 and abs(first["rewards/chosen"]) < 1e-3, (stage, first)
        assert metrics["train_implicit_accuracy"] >= 0.8, (stage, metrics)
        assert metrics["train_implicit_margin"] > 0.0
        assert metrics["train_implicit_reward_chosen"] > metrics["train_implicit_reward_rejected"]


def _base_storages(ctx, trainer, reference) -> float:
    """Copies of the base weights held in memory: distinct non-adapter storages of the policy and the
    reference, over the distinct storages of one freshly loaded model."""
    ptrs = {p.data_ptr() for n, p in trainer.model.named_parameters(remove_duplicate=False) if "lora_" not in n}
    for model in (trainer.ref_model, reference):
        if model is not None:
            ptrs |= {p.data_ptr() for p in model.parameters()}
    return len(ptrs) / len({p.data_ptr() for p in ctx.load_model().parameters()})


@pytest.mark.slow
def test_lora_reference_is_the_adapter_switched_off(trained):
    path, _ = trained
    recipe = load_recipe(path)
    copies = {}
    for stage in ("dpo", "dpo_lora"):
        ctx = make_context(recipe, stage)
        trainer, reference, _ = dpo.build_trainer(ctx)
        copies[stage] = _base_storages(ctx, trainer, reference)
        if stage == "dpo_lora":
            assert trainer.ref_model is None and reference is None
            # the reference the stage measures KL against: the same storages, adapter off
            ref = AdapterOff(trainer.model)
            assert {p.data_ptr() for p in ref.parameters()} == {p.data_ptr() for p in trainer.model.parameters()}
            ids = torch.tensor([[1, 2, 3, 4]])
            with torch.no_grad():
                for n, p in trainer.model.named_parameters():  # LoRA starts as a no-op; make it matter
                    if "lora_B" in n:
                        p.fill_(0.5)
                on, off = trainer.model(input_ids=ids).logits, ref(input_ids=ids).logits
                base = ctx.load_model()(input_ids=ids).logits
            assert not torch.allclose(on, off)
            assert torch.allclose(off, base, atol=1e-5)
    assert copies == {"dpo": 2.0, "dpo_lora": 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("stage, precompute", [("dpo", True), ("dpo", False), ("dpo_lora", False)],
                         ids=["full-precomputed-ref", "full-live-ref", "lora-adapter-off-ref"])
def test_padding_free_forwards_train_as_padded_ones(trained, stage, precompute):
    """Policy and reference forwards flattened (alignpipe.runtime.padding_free): TRL's own padded batches, truncation
    and loss code, the same step-1 loss and implicit rewards as padded forwards."""
    from transformers import set_seed

    path, _ = trained
    logs = {}
    for setting in (False, True):
        set_seed(0)
        ctx = make_context(load_recipe(path), stage)
        ctx.config.padding_free = setting
        ctx.config.trainer = {**ctx.config.trainer, "max_steps": 3, "precompute_ref_log_probs": precompute,
                              "max_length": 40}  # some pairs cut: the same cut both ways
        trainer, _, counts = dpo.build_trainer(ctx)
        assert counts["batching"] == ("padding_free" if setting else "padded"), counts
        trainer.train()
        logs[setting] = [h for h in trainer.state.log_history if "loss" in h]
    padded, flat = logs[False], logs[True]
    assert len(padded) == len(flat) == 3
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert flat[0][key] == pytest.approx(padded[0][key], rel=1e-4, abs=1e-5), key
    assert flat[-1]["loss"] == pytest.approx(padded[-1]["loss"], rel=1e-2)


@pytest.mark.parametrize("trainer, message", [
    ({"loss_type": ["sigmoid", "hinge2"]}, "unknown DPO loss type 'hinge2'"),
    ({"loss_type": "simpo"}, "'simpo' is not a DPO loss type in TRL 1.16: SimPO is stage kind cpo with trainer.loss_type simpo"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 loss_weights for 2 loss types"),
])
def test_recipe_checks_loss_settings(tmp_path, trainer, message):
    stages = {"dpo": {"from": "sft", "data": {"embedded": "pairs"}, "trainer": trainer}}
    path = write_yaml(tmp_path / "bad.yaml", tiny_recipe(tmp_path / "runs", extra_stages=stages))
    with pytest.raises(RecipeError, match=message):
        validate(load_recipe(path))


def test_dpo_without_from_needs_a_model_path(tmp_path):
    stages = {"dpo": {"data": {"embedded": "pairs"}}}
    path = write_yaml(tmp_path / "bad.yaml", tiny_recipe(tmp_path / "runs", extra_stages=stages))
    with pytest.raises(RecipeError, match="from"):
        validate(load_recipe(path))


def test_variants_recipe_shares_the_default_runs():
    """recipes/dpo-variants.yaml writes into runs/default: its upstream blocks must equal the default's, or running
    it would start the default's pretrain/sft over."""
    default, variants = (load_recipe(REPO / "recipes" / f) for f in ("default.yaml", "dpo-variants.yaml"))
    assert variants.name == default.name
    for attr in ("seed", "runs_dir", "model", "chat_template", "world"):
        assert to_plain(getattr(variants, attr)) == to_plain(getattr(default, attr)), attr
    for stage in ("pretrain", "sft"):
        assert to_plain(variants.stages[stage]) == to_plain(default.stages[stage]), stage
    assert all(cfg.kind == "dpo" for name, cfg in variants.stages.items() if name not in ("pretrain", "sft"))


def test_on_a_cpu_trls_fused_head_runs_in_narrow_tiles_and_scores_as_the_plain_head():
    """TRL's fused LM head allocates a [tokens, tile] buffer per call (32,768 columns by default), which on a CPU
    cost more than the projection; a CPU stage narrows it when it starts training (`narrow_fused_head_tiles`,
    called by `training.train`). Checked with a vocabulary wider than a tile (several tiles, summed online): the
    per-token log-probs are the plain head's."""
    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignpipe.stages.training import CPU_HEAD_TILE_COLUMNS, narrow_fused_head_tiles

    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    try:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 32768
        narrow_fused_head_tiles()
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == CPU_HEAD_TILE_COLUMNS

        torch.manual_seed(0)
        vocab = 2 * CPU_HEAD_TILE_COLUMNS + 123
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                             num_attention_heads=2, vocab_size=vocab)).eval()
        ids = torch.randint(0, vocab, (2, 9))
        labels = ids.clone()
        labels[0, :3] = -100
        with torch.no_grad():
            plain = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            want = plain.gather(-1, ids[:, 1:, None])[..., 0]
            trl_utils.add_fused_lm_head(model)
            got = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        mask = labels[:, 1:] != -100
        torch.testing.assert_close(got[:, -mask.shape[1]:][mask], want[mask], atol=1e-5, rtol=1e-5)
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = default


def test_a_renamed_trl_tile_constant_is_one_warning_not_an_error(monkeypatch):
    """The tile width is a private constant of TRL's: when TRL renames it, training goes on in TRL's own tiles,
    and one warning line says so."""
    import trl.trainer.utils as trl_utils

    from alignpipe.stages.training import FUSED_HEAD_TILE, narrow_fused_head_tiles

    monkeypatch.delattr(trl_utils, FUSED_HEAD_TILE)
    with pytest.warns(UserWarning, match=f"trl.trainer.utils.{FUSED_HEAD_TILE} is gone"):
        narrow_fused_head_tiles()
    assert not hasattr(trl_utils, FUSED_HEAD_TILE)
