"""Padding-free batches (alignpipe.runtime.padding_free): the same rows, truncation and labels as padded batches, so the
same first loss; the automatic check keeps padded batches on a model where flattening is not exact (BLOOM: its
ALiBi positions come from the attention mask, not from position_ids), and the manifest says which was used."""

from __future__ import annotations

import json

import pytest

from alignpipe.cli import main
from alignpipe.models.tiny import arithmetic
from alignpipe.runfolder.manifests import read_manifest
from conftest import TINY_EVAL, write_yaml


def train_rows(stage_dir) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
def test_padding_free_sft_trains_on_the_same_tokens_as_padded(tiny):
    runs = tiny.parent / "runs" / "tiny"
    logs, manifests = {}, {}
    for setting in ("false", "true"):
        assert main(["run", str(tiny), "--stages", "sft", "--force", "--set", f"stages.sft.padding_free={setting}",
                     "--set", "stages.sft.trainer.max_length=24"]) == 0  # some rows are cut: same cut both ways
        logs[setting], manifests[setting] = train_rows(runs / "sft"), read_manifest(runs / "sft")["metrics"]
    assert manifests["false"]["batching"] == "padded"
    assert manifests["true"]["batching"] == "padding_free", manifests["true"]["batching_reason"]
    padded, flat = logs["false"], logs["true"]
    assert len(padded) == len(flat) >= 3
    # step 1 is the same work: same loss, same real tokens (padded counts its mask, padding-free has no pad)
    assert flat[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-4)
    for p, f in zip(padded, flat):
        assert f["num_tokens"] == p["num_tokens"]
        assert f["loss"] == pytest.approx(p["loss"], rel=2e-2)


@pytest.mark.slow
def test_auto_check_keeps_padded_batches_where_flattening_is_not_exact(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    from alignpipe.runtime.padding_free import choose, flattening_error

    text = tmp_path / "text.txt"
    text.write_text("".join(f"{q} {r} {w}\n" for q, r, w in arithmetic(100)))
    model_dir = tmp_path / "tiny-bloom"
    assert main(["tiny-model", "--like", "qwen2", "--out", str(model_dir), "--text", str(text)]) == 0
    qwen = json.loads((model_dir / "config.json").read_text())
    bloom = BloomForCausalLM(BloomConfig(vocab_size=qwen["vocab_size"], hidden_size=32, n_layer=2, n_head=2,
                                         eos_token_id=qwen["eos_token_id"], pad_token_id=qwen.get("pad_token_id")))
    assert "not exact" in choose(bloom, None, "unit").reason and flattening_error(bloom)
    assert choose(bloom, True, "unit").padding_free  # the recipe can still force it
    bloom.save_pretrained(model_dir)  # BLOOM weights beside the look-alike's tokenizer

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": r}]}) + "\n"
                            for q, r, _ in arithmetic(32)))
    recipe = write_yaml(tmp_path / "bloom.yaml", {
        "name": "bloom", "seed": 0, "runs_dir": str(tmp_path / "runs"), "model": {"path": str(model_dir)},
        "chat_template": "chatml",
        "stages": {"sft": {"data": {"path": str(chat)}, "eval": TINY_EVAL,
                           "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 48}}}})
    assert main(["run", str(recipe)]) == 0
    metrics = read_manifest(tmp_path / "runs" / "bloom" / "sft")["metrics"]
    assert metrics["batching"] == "padded"
    assert "not exact" in metrics["batching_reason"]


def test_flattened_forward_gives_the_padded_per_token_outputs():
    """The DPO hooks on a fused-head model: the body sees one row of real tokens, the trainer gets the padded
    layout back with the same log-probs (zeros at the pad)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from alignpipe.runtime.padding_free import Batching, flatten_padded_forward

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    lengths = torch.tensor([5, 9, 3, 9])
    ids = torch.randint(1, 50, (4, 9))
    mask = (torch.arange(9) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        seen = []
        model.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape), with_kwargs=True)
        flatten_padded_forward(model, Batching(True, "forced"))
        flat = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert seen == [torch.Size([1, int(lengths.sum())])]
    assert flat.log_probs.shape == padded.log_probs.shape
    assert torch.allclose(flat.log_probs, padded.log_probs, atol=1e-5)
    assert torch.allclose(flat.entropy, padded.entropy, atol=1e-5)
    assert torch.equal(flat.label_mask, padded.label_mask)
    assert padded.log_probs[0, 4:].abs().sum() == 0  # the pad stays zero


def test_auto_flattens_a_batch_only_where_that_costs_less():
    """With a dense mask the flattened row's attention grows with the square of its tokens: the peer bench's
    batches (8 rows of ~33 tokens) run flattened, the default DPO's (64 rows of ~40 of up to 60) stay padded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignpipe.runtime.padding_free import choose

    def model(layers, hidden, mlp):
        return LlamaForCausalLM(LlamaConfig(vocab_size=450, hidden_size=hidden, num_hidden_layers=layers,
                                            intermediate_size=mlp, num_attention_heads=4, num_key_value_heads=4))

    peer = choose(model(2, 128, 608), None, "peer")
    assert peer.padding_free and peer.costs is not None
    assert peer.flatten([20, 33, 64, 25, 40, 30, 28, 26])
    default = choose(model(4, 128, 512), None, "default")
    assert not default.flatten([40] * 63 + [60])
    assert choose(model(4, 128, 512), True, "forced").flatten([40] * 63 + [60])  # true: every batch
