"""Reward stage on a tiny model: full and LoRA training move the score head and lower the loss; the saved
artifact reloads to the same scores (head included); scoring matches training's tokenisation; bad
pairs are counted and an error raised when none is usable; `alignpipe score` prints scores."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignpipe.cli import main
from alignpipe.errors import AlignpipeError, RecipeError
from alignpipe.pipeline.runner import run_recipe
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.schema import LoraSpec
from alignpipe.reward import metrics as M
from alignpipe.reward.artifact import OneOutput, encode, load_reward_model, save_reward_model, score, score_ids
from alignpipe.reward.pairs import filter_pairs
from alignpipe.stages import reward as stage
from alignpipe.stages.context import make_context
from conftest import TINY_EVAL, copy_base, tiny_recipe, write_yaml

REWARD = {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL,
          "trainer": {"max_steps": 24, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 0,
                      "logging_steps": 1}}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_base):
    """A tiny recipe with the session's pretrain + sft; the reward stages are run by the tests."""
    root = tmp_path_factory.mktemp("reward")
    path = write_yaml(root / "tiny.yaml", tiny_recipe(root / "runs", extra_stages={"reward": REWARD}))
    copy_base(tiny_base, root / "runs")
    return path


def _context(path, tmp_path, lora: LoraSpec | None = None):
    ctx = make_context(load_recipe(path), "reward")
    ctx.dir = tmp_path / "reward"  # outside the run folder: these tests drive the stage's pieces
    ctx.config.lora = lora
    return ctx


def _train(ctx):
    from transformers import set_seed

    set_seed(0)
    trainer, evals, report, _ = stage.build_trainer(ctx)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, evals, before, losses


def _changed(before: dict, model, name_part: str) -> list[str]:
    return [k for k, v in model.named_parameters() if name_part in k and not torch.equal(before[k], v.detach())]


@pytest.mark.slow
def test_full_trains_head_and_reloads_to_the_same_scores(built, tmp_path):
    ctx = _context(built, tmp_path)
    trainer, evals, before, losses = _train(ctx)
    model, tok = trainer.model.eval(), trainer.processing_class
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert _changed(before, model, "score.weight") == ["score.weight"]
    assert len(_changed(before, model, "layers.")) > 10  # full fine-tuning moved the body too
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    # scoring renders (prompt, response) exactly as RewardTrainer tokenised it for training
    row = trainer.train_dataset[0]  # TRL's map left "chosen" as prompt + chosen
    ids = encode(tok, [row["prompt"]], [row["chosen"][len(row["prompt"]):]])[0]
    assert ids == row["chosen_ids"]

    prompts = [p["prompt"] for p in evals]
    responses = [p["chosen"][0]["content"] for p in evals]
    from alignpipe.reward.artifact import RewardArtifact

    in_memory = score(RewardArtifact(model, tok, 0.0, 1.0), prompts, responses, batch_size=7)
    save_reward_model(ctx.dir, model, tok, {"mean": 0.5, "std": 2.0})
    fresh = load_reward_model(ctx.dir)
    assert type(fresh.model).__name__ == "LlamaForSequenceClassification" and not fresh.model.training
    assert (fresh.mean, fresh.std) == (0.5, 2.0)
    assert fresh.tokenizer.chat_template == tok.chat_template
    reloaded = score(fresh, prompts, responses)
    assert max(abs(a - b) for a, b in zip(in_memory, reloaded)) < 1e-5
    assert fresh.normalise([2.5]) == [1.0]
    # the scores are not all alike (a lost head would give the same score to everything)
    assert max(in_memory) - min(in_memory) > 1e-3

    # score_ids: left padding, right padding and no padding give the same score
    one = torch.tensor([ids])
    pad = tok.pad_token_id
    left = torch.tensor([[pad, pad] + ids]), torch.tensor([[0, 0] + [1] * len(ids)])
    right = torch.tensor([ids + [pad, pad]]), torch.tensor([[1] * len(ids) + [0, 0]])
    alone = score_ids(fresh, one, torch.ones_like(one))
    for batch in (left, right):
        assert torch.allclose(score_ids(fresh, *batch), alone, atol=1e-5)


@pytest.mark.slow
def test_lora_trains_adapter_and_head_and_saves_both(built, tmp_path):
    from peft import PeftModel

    ctx = _context(built, tmp_path, LoraSpec(r=4, alpha=8))
    trainer, evals, before, losses = _train(ctx)
    model, tok = trainer.model.eval(), trainer.processing_class
    head = _changed(before, model, "score")
    assert head and all("modules_to_save" in k for k in head)  # the head is trained in full beside the adapter
    assert _changed(before, model, "lora_B")
    frozen = [k for k, _ in model.named_parameters() if "base_layer" in k]
    assert frozen and not _changed(before, model, "base_layer")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    prompts = [p["prompt"] for p in evals]
    responses = [p["rejected"][0]["content"] for p in evals]
    from alignpipe.reward.artifact import RewardArtifact

    in_memory = score(RewardArtifact(model, tok, 0.0, 1.0), prompts, responses)
    save_reward_model(ctx.dir, model, tok, {"mean": 0.0, "std": 1.0})
    adapter = load_file(ctx.dir / "adapter" / "adapter_model.safetensors")
    assert any("score" in k for k in adapter), "the adapter must carry the score head"
    assert not (ctx.dir / "model" / "adapter_config.json").exists()  # model/ is the merged copy

    merged = score(load_reward_model(ctx.dir), prompts, responses)
    assert max(abs(a - b) for a, b in zip(in_memory, merged)) < 1e-4
    # the adapter + head over the parent's body scores the same too
    base = OneOutput.from_pretrained(ctx.parent_dir / "model")
    base.config.pad_token_id = tok.pad_token_id
    over_base = PeftModel.from_pretrained(base, str(ctx.dir / "adapter")).eval()
    again = score(RewardArtifact(over_base, tok, 0.0, 1.0), prompts, responses)
    assert max(abs(a - b) for a, b in zip(in_memory, again)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8)], ids=["full", "lora"])
def test_padding_free_pairs_train_as_padded_ones(built, tmp_path, lora):
    """Chosen and rejected in one flattened row, scored at each sequence's last token: the same step-1 loss,
    accuracy and margin as padded batches (under peft too: its copy of the score head is the one hooked)."""
    from transformers import set_seed

    logs = {}
    for setting in (False, True):
        set_seed(0)  # the same fresh score head
        ctx = _context(built, tmp_path / str(setting), lora)
        ctx.config.padding_free = setting
        ctx.config.trainer = {**ctx.config.trainer, "max_steps": 3}
        trainer, _, _, batches = stage.build_trainer(ctx)
        assert batches.padding_free is setting, batches.reason
        trainer.train()
        logs[setting] = [h for h in trainer.state.log_history if "loss" in h]
    padded, flat = logs[False], logs[True]
    assert len(padded) == len(flat) == 3
    for key in ("loss", "accuracy", "margin", "num_tokens"):
        assert flat[0][key] == pytest.approx(padded[0][key], rel=1e-4, abs=1e-6), key
    assert flat[-1]["loss"] == pytest.approx(padded[-1]["loss"], rel=1e-2)


@pytest.mark.slow
def test_stage_end_to_end_and_score_command(built, tmp_path, capsys):
    assert main(["run", str(built), "--stages", "reward"]) == 0
    out_dir = built.parent / "runs" / "tiny" / "reward"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["status"] == "complete"
    assert m["reload_max_abs_diff"] <= 1e-4
    assert 0.0 <= m["pairwise_accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
    assert m["pairs_train"] == 120 and m["pairs_dropped"] == 0
    assert m["reward_std"] > 0 and m["samples_judged"] == 16 and m["reward_stats_on"] == "parent_samples"
    assert m["train_loss"] < m["train_loss_first"]
    samples = [json.loads(line) for line in (out_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all("reward" in s and "judge" in s for s in samples)
    stats = json.loads((out_dir / "model" / "reward.json").read_text())
    assert (stats["mean"], stats["std"]) == (m["reward_mean"], m["reward_std"])

    # alignpipe score: the same numbers as the library call, on the run folder or the stage folder
    artifact = load_reward_model(out_dir)
    expected = score(artifact, ["what is 2 plus 3?"] * 2, ["The answer is 5.", "Well, let me think. The answer is 5."])
    capsys.readouterr()
    assert main(["score", str(built.parent / "runs" / "tiny"), "--prompt", "what is 2 plus 3?",
                 "--response", "The answer is 5.", "--response", "Well, let me think. The answer is 5."]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [float(line.split()[0]) for line in lines] == pytest.approx(expected, abs=1e-3)

    batch = tmp_path / "rows.jsonl"
    batch.write_text(json.dumps({"prompt": "what is 2 plus 3?", "response": "The answer is 5.", "id": 7}) + "\n")
    assert main(["score", str(out_dir), "--jsonl", str(batch)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["id"] == 7 and row["reward"] == pytest.approx(expected[0], abs=1e-5)
    assert row["reward_normalised"] == pytest.approx((row["reward"] - m["reward_mean"]) / m["reward_std"])

    assert main(["score", str(out_dir), "--prompt", "hi"]) == 2  # no response: a one-line error
    assert "--response" in capsys.readouterr().err


def test_bad_pairs_counted_and_nothing_usable_is_an_error():
    good = {"prompt": "add 1 and 2.", "chosen": "The answer is 3.", "rejected": "The answer is 4."}
    rows = [
        good,
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "a"}]},  # identical
        {**good, "rejected": "   "},  # empty response
        {"prompt": "add 1 and 2.", "chosen": "The answer is 3."},  # no rejected
        {**good, "chosen": None},  # missing
        {**good, "prompt": ""},  # empty prompt
        "not a row",
    ]
    kept, report = filter_pairs(rows, "train")
    assert len(kept) == 1 and kept[0]["prompt"] == [{"role": "user", "content": "add 1 and 2."}]
    assert report.dropped == {"identical": 1, "empty_response": 1, "missing_field": 3, "empty_prompt": 1}
    assert report.first_rows["missing_field"] == [4, 5, 7]
    assert "7 read, 1 usable, 6 dropped" in report.summary()
    with pytest.raises(AlignpipeError, match="no usable preference pairs"):
        filter_pairs(rows[1:], "train")


@pytest.mark.slow
def test_too_long_pairs_are_counted(built, tmp_path):
    tok = make_context(load_recipe(built), "reward").load_tokenizer()
    short = {"prompt": "add 1 and 2.", "chosen": "The answer is 3.", "rejected": "no."}
    long = {**short, "rejected": "Well, " * 50}
    kept, report = filter_pairs([short, long], "train", tok, max_length=40)
    assert kept and report.dropped == {"too_long": 1}


@pytest.mark.slow
def test_user_file_with_only_bad_pairs_fails_before_training(built, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}) for _ in range(3)))
    assert main(["run", str(built), "--stages", "reward", "--set", f"stages.reward.data={{path: {data}}}"]) == 2
    err = capsys.readouterr().err
    assert "no usable" in err and "identical" in err


def test_recipe_checks():
    from alignpipe.pipeline.validate import validate
    from alignpipe.recipe.parse import parse_recipe
    from pathlib import Path

    data = tiny_recipe(Path("/tmp/unused"), extra_stages={"reward": {**REWARD, "data": {"embedded": "sft"}}})
    with pytest.raises(RecipeError, match="preference pairs"):
        validate(parse_recipe(data, Path("r.yaml")))


def test_metrics_by_hand():
    assert M.pairwise_accuracy([1.0, -1.0, 0.0, 2.0]) == 0.5  # a tie is not a correct ordering
    ece, table = M.calibration([0.0, 10.0])  # confidences 0.5 (wrong) and ~1.0 (right)
    assert ece == pytest.approx(0.5 * 0.5 + 0.5 * (1 - M.sigmoid(10.0)))
    assert [b["count"] for b in table] == [1, 1]
    assert M.auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and M.pearson([1, 1], [1, 2]) is None
    prompts, passed = ["a", "a", "a", "b", "b"], [True, False, False, True, True]
    assert M.onpolicy_pairs(prompts, passed) == [(0, 1), (0, 2)]  # prompt b has no failing sample
    m = M.judged_metrics(prompts, [1.0, 0.0, 2.0, 5.0, 5.0], passed, [3, 3, 3, 3, 3])
    assert m["onpolicy_accuracy"] == 0.5 and m["onpolicy_pairs"] == 2 and m["reward_length_corr"] is None
