"""End to end on a tiny model: pretrain -> sft trains for real, writes a manifest chain, skips when
nothing changed, re-runs with --force, and gives the same metrics for the same seed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignpipe.cli import main
from alignpipe.data.world import World, WorldConfig
from alignpipe.stages.helpers import pack
from alignpipe.stages.pretrain import unigram_perplexity
from conftest import TINY_WORLD, stage_manifest


@pytest.mark.slow
def test_pretrain_then_sft(tiny, capsys):
    runs = tiny.parent / "runs" / "tiny"
    assert main(["run", str(tiny)]) == 0
    pre, sft = stage_manifest(runs / "pretrain"), stage_manifest(runs / "sft")

    # both complete, with the lineage and inputs recorded
    assert pre["status"] == sft["status"] == "complete"
    assert sft["parent"]["stage"] == "pretrain"
    assert sft["parent"]["manifest_sha256"]
    assert sft["lineage"] == ["pretrain"]
    assert sft["versions"]["torch"] == torch.__version__
    assert sft["resolved_config"]["from"] == "pretrain"
    for m in (pre, sft):
        assert m["seed"] == 0 and m["fingerprint"] and m["wall_time_s"] > 0

    # pretraining learned something: loss fell, perplexity below the unigram baseline's
    pm = pre["metrics"]
    assert pm["train_loss"] < pm["train_loss_first"]
    assert pm["perplexity"] < pm["unigram_perplexity"]
    assert_evaluated_on_held_out(tiny, runs)

    # SFT changed the weights it started from
    before = load_file(runs / "pretrain" / "model" / "model.safetensors")
    after = load_file(runs / "sft" / "model" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2

    # the checkpoint carries the tokenizer and the recipe's chat template
    assert (runs / "sft" / "model" / "chat_template.jinja").is_file()

    # a second run skips both stages
    capsys.readouterr()
    assert main(["run", str(tiny)]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 2
    assert stage_manifest(runs / "sft")["fingerprint"] == sft["fingerprint"]

    # --force re-runs the named stage only, and the same seed gives the same metrics
    assert main(["run", str(tiny), "--stages", "sft", "--force"]) == 0
    err = capsys.readouterr().err
    assert "stage pretrain: complete with the same config" in err and "starting over (--force)" in err
    again = stage_manifest(runs / "sft")
    assert again["metrics"]["judge_pass_rate"] == sft["metrics"]["judge_pass_rate"]
    assert abs(again["metrics"]["eval_loss"] - sft["metrics"]["eval_loss"]) < 1e-6

    # settings that cannot change the result (logging, progress, checkpoints kept, eval batch) skip the stage
    assert main(["run", str(tiny), "--set", "stages.sft.trainer.logging_steps=1", "--set",
                 "stages.sft.trainer.disable_tqdm=false", "--set", "stages.sft.trainer.save_total_limit=5",
                 "--set", "stages.sft.trainer.per_device_eval_batch_size=3"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 2 and "starting over" not in err

    # a changed config re-runs that stage (and nothing upstream), and the log names the key: old -> new
    assert main(["run", str(tiny), "--set", "stages.sft.trainer.learning_rate=5e-4"]) == 0
    err = capsys.readouterr().err
    assert "its config or inputs changed: config.trainer.learning_rate: 0.001 -> 0.0005" in err, err
    assert err.count("skipped") == 1


def assert_evaluated_on_held_out(recipe_path, runs) -> None:
    """Each stage's evaluation used the world's held-out data: sft's samples answer exactly the held-out
    prompts (none of them a training prompt), its pass rate is the judge's verdict on those samples, and
    pretraining's perplexity is the model's on the held-out corpus, not on its training text."""
    import math

    from alignpipe.data.world import judge
    from alignpipe.models.loading import load_stage_model, load_tokenizer
    from alignpipe.recipe.parse import load_recipe
    from alignpipe.stages.context import make_context
    from alignpipe.stages.helpers import pack

    recipe = load_recipe(recipe_path)
    ctx = make_context(recipe, "sft")
    spec, world = ctx.config.eval, ctx.world
    held_out = [p["prompt"] for p in world.eval_prompts()[: spec.num_prompts]]
    assert len(held_out) == spec.num_prompts
    rows = [json.loads(line) for line in (runs / "sft" / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p in held_out for _ in range(spec.samples_per_prompt)]
    trained_on = {r["messages"][0]["content"] for r in world.sft_rows()}
    trained_on |= {p["prompt"][0]["content"] for p in world.rl_prompts()}
    trained_on |= {p["prompt"][0]["content"] for p in world.preference_rows("train")}
    assert not trained_on & set(held_out)
    metrics = stage_manifest(runs / "sft")["metrics"]
    verdicts = [r["ended"] and judge(r["prompt"], r["response"]) for r in rows]
    assert [r["judge"] for r in rows] == verdicts
    assert metrics["judge_total"] == len(rows) and metrics["judge_passed"] == sum(verdicts)
    assert metrics["judge_pass_rate"] == sum(verdicts) / len(rows)

    # pretraining's perplexity, recomputed here on the held-out corpus (and, to tell them apart, on its training text)
    pre = make_context(recipe, "pretrain")
    tokenizer = load_tokenizer(runs / "pretrain" / "model", recipe.model)
    model = load_stage_model(runs / "pretrain", recipe.model).eval()

    def perplexity(texts):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        blocks = torch.tensor(pack([d + [tokenizer.eos_token_id] for d in ids], pre.config.block_size))
        with torch.no_grad():
            return math.exp(model(input_ids=blocks, labels=blocks).loss.item())

    measured = stage_manifest(runs / "pretrain")["metrics"]["perplexity"]
    assert measured == pytest.approx(perplexity(world.corpus_eval()[: pre.config.eval_docs]), rel=1e-4)
    assert measured != pytest.approx(perplexity(world.corpus()), rel=1e-2)


@pytest.mark.slow
def test_show_prints_lineage(tiny, capsys):
    assert main(["run", str(tiny), "--stages", "pretrain", "--set", "stages.pretrain.eval.enabled=false"]) == 0
    capsys.readouterr()
    assert main(["show", str(tiny.parent / "runs" / "tiny")]) == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "perplexity" in out


@pytest.mark.slow
def test_stage_refuses_incomplete_parent(tiny, capsys):
    from alignpipe.errors import RunError
    from alignpipe.pipeline.runner import run_stage
    from alignpipe.recipe.parse import load_recipe
    import pytest

    recipe = load_recipe(tiny)
    with pytest.raises(RunError, match="does not exist"):
        run_stage(recipe, "sft")
    parent = recipe.stage_dir("pretrain")
    parent.mkdir(parents=True)
    (parent / "manifest.json").write_text(json.dumps({"schema": 1, "status": "running"}))
    with pytest.raises(RunError, match="status is 'running'"):
        run_stage(recipe, "sft")


def test_pack_and_unigram_baseline():
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the tail [9] is dropped
    # a uniform unigram over 4 tokens seen equally often has perplexity ~4
    train = [[0, 1, 2, 3]] * 100
    assert abs(unigram_perplexity(train, [[0, 1, 2, 3]], 4) - 4.0) < 0.01


def test_world_is_seeded_from_recipe():
    a = World(WorldConfig(seed=1, **TINY_WORLD)).sft_rows()
    b = World(WorldConfig(seed=1, **TINY_WORLD)).sft_rows()
    assert a == b


@pytest.mark.slow
def test_plain_and_fused_lm_head_give_the_same_training(tiny):
    """On a CPU the sft stage uses the model's own LM head and loss instead of TRL's fused, chunked one (faster
    on small models, see stages/sft.py); the loss and the logged metrics must be the same either way."""
    runs = tiny.parent / "runs" / "tiny"
    logs = {}
    for fused in ("false", "true"):
        assert main(["run", str(tiny), "--stages", "sft", "--force",
                     "--set", f"stages.sft.fused_lm_head={fused}"]) == 0
        rows = [json.loads(line) for line in (runs / "sft" / "train_log.jsonl").read_text().splitlines()]
        logs[fused] = [r for r in rows if "loss" in r]
    assert len(logs["false"]) == len(logs["true"]) >= 3
    for plain, fused in zip(logs["false"], logs["true"]):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert abs(plain[key] - fused[key]) <= 1e-3 * max(1.0, abs(fused[key])), (key, plain, fused)
