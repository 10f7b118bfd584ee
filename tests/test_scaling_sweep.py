"""The scaling stage's sweep: its grid, its parameter counting, its recipe checks, and a killed sweep of two seeds
per point that resumes where it was (its complete runs are kept, not trained again)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import alignpipe
from alignpipe.cli import main
from alignpipe.errors import RecipeError, RunError
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.schema import ModelInit
from alignpipe.stages import sweep
from conftest import write_yaml
from kill_harness import KILLER

BASE = {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 128, "num_attention_heads": 2,
        "vocab_size": 300}


def sweep_recipe(runs: Path, **stage) -> dict:
    """A sweep small enough for a test: 3 sizes x 2 budgets; the largest size first, so its short runs
    finish before the smallest size's long one."""
    cfg = {"data": {"embedded": "corpus"}, "eval_docs": 40, "min_steps": 5, "bootstrap": 20,
           "sizes": [{"hidden_size": 48}, {"hidden_size": 32}, {"hidden_size": 16}],
           "budgets": [2.0e9, 4.0e9], "trainer": {"per_device_train_batch_size": 8}, **stage}
    return {"name": "sweep", "seed": 0, "runs_dir": str(runs), "model": {"init": dict(BASE)},
            "chat_template": "embedded", "world": {"n_corpus_docs": 2000, "n_corpus_eval_docs": 60},
            "stages": {"scaling": cfg}}


def test_sizes_scale_width_keeping_head_width_and_mlp_ratio():
    base = ModelInit(**BASE)
    wide = sweep.scaled_init(base, {"hidden_size": 96, "num_hidden_layers": 3})
    assert (wide.hidden_size, wide.num_hidden_layers, wide.intermediate_size, wide.num_attention_heads) == \
        (96, 3, 384, 6)
    assert sweep.scaled_init(base, {"hidden_size": 64, "intermediate_size": 100}).intermediate_size == 100


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_are_those_of_the_built_model(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    init = sweep.scaled_init(ModelInit(**BASE, tie_word_embeddings=tied), {"hidden_size": 64, "num_hidden_layers": 2,
                                                                          "num_key_value_heads": 2})
    vocab = 301
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=init.hidden_size,
                                         intermediate_size=init.intermediate_size,
                                         num_hidden_layers=init.num_hidden_layers,
                                         num_attention_heads=init.num_attention_heads,
                                         num_key_value_heads=init.num_key_value_heads,
                                         tie_word_embeddings=tied))
    counts = sweep.parameter_counts(init, vocab)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == model.get_input_embeddings().weight.numel()
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]


def test_grid_leaves_out_short_runs_and_refuses_more_tokens_than_the_corpus():
    sizes = [sweep.scaled_init(ModelInit(**BASE), {"hidden_size": h}) for h in (16, 32, 256)]
    points, left = sweep.plan_grid(sizes, [4e9, 2e9], 300, "total", 512, 5, 10**6, "r.yaml")
    assert [p["budget"] for p in points] == [2e9, 2e9, 4e9, 4e9]  # budgets in order; h256 too short at both
    assert [p["init"]["hidden_size"] for p in left] == [256, 256] and "min_steps" in left[0]["why"]
    for p in points:
        assert p["d"] % 512 == 0 and p["c"] == 6 * p["n"] * p["d"]
        assert abs(p["c"] / p["budget"] - 1) < 0.1
    with pytest.raises(RunError, match="needs .* training tokens; the corpus holds 10,000"):
        sweep.plan_grid(sizes, [2e9], 300, "total", 512, 5, 10_000, "r.yaml")


@pytest.mark.parametrize("change, message", [
    ({"sizes": [{"hidden_size": 16}, {"hidden_size": 32}]}, "at least 3 sizes"),
    ({"sizes": [{"hidden_size": 16}, {"width": 32}, {"hidden_size": 48}]}, "not a mapping of model.init fields"),
    ({"count": "embedding"}, "count 'embedding'"),
    ({"trainer": {"max_steps": 10}}, "steps come from its budget"),
    ({"lr_rule": "depth"}, "lr_rule 'depth'"),
    ({"seeds": 0}, "seeds 0 is not a whole number"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, change, message):
    path = write_yaml(tmp_path / "s.yaml", sweep_recipe(tmp_path / "runs", **change))
    from alignpipe.pipeline.validate import validate

    with pytest.raises(RecipeError, match=message):
        validate(load_recipe(path))


@pytest.mark.slow
def test_a_killed_sweep_resumes_where_it_was(tmp_path):
    path = write_yaml(tmp_path / "s.yaml", sweep_recipe(tmp_path / "runs", seeds=2, lr_rule="width",
                                                       trainer={"per_device_train_batch_size": 8,
                                                                "learning_rate": 4e-3}))
    stage = tmp_path / "runs" / "sweep" / "scaling"
    # steps per point at 2e9 FLOPs: h48 13, h32 25, h16 73, each run twice (seeds 0 and 1); killed at step 40 of
    # the fifth run (h16's first seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_STEP": "40",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(alignpipe.__file__).parents[1])])}
    proc = subprocess.run([sys.executable, "-c", KILLER, "run", str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    done = sorted(p.parent.name for p in stage.glob("points/*/manifest.json"))
    assert done == ["c2e09-h32-l1", "c2e09-h32-l1-seed1", "c2e09-h48-l1", "c2e09-h48-l1-seed1"]
    assert (stage / "points" / "c2e09-h16-l1").is_dir()  # begun, never finished
    before = {name: (stage / "points" / name / "manifest.json").stat().st_mtime_ns for name in done}

    assert main(["run", str(path)]) == 0
    for name, mtime in before.items():  # the complete points were read back, not trained again
        assert (stage / "points" / name / "manifest.json").stat().st_mtime_ns == mtime
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["points"] == 6
    assert "4 of 12 runs (6 points x 2 seeds) complete from an earlier attempt" in (stage / "stage.log").read_text()
    details = json.loads((stage / "scaling.json").read_text())
    runs = [json.loads((stage / "points" / f"c2e09-h48-l1{s}" / "manifest.json").read_text())["point"]
            for s in ("", "-seed1")]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["learning_rate"] == pytest.approx(4e-3 * 32 / 48)  # lr_rule width: base width 32
    for p in details["points"]:  # the fits read each point's mean over its two seeds
        assert len(p["losses"]) == 2 and p["loss"] == pytest.approx(sum(p["losses"]) / 2)
    held = details["holdout_manifest"]["metrics"]
    assert len(held["eval_losses"]) == 2 and held["eval_loss"] == pytest.approx(sum(held["eval_losses"]) / 2)
    prediction = details["prediction"]
    assert prediction["holdout"]["budget"] == 8e9 and prediction["holdout"]["name"] not in done
    assert (stage / "model" / "config.json").is_file()  # the held-out point's model is the stage's model
    assert details["holdout_result"]["measured"] == manifest["metrics"]["eval_loss"]

    # the report draws the sweep: its figures, its constants table and the recipe line of the optimum
    assert main(["report", str(stage.parent)]) == 0
    report = (stage.parent / "report.md").read_text()
    assert "## Scaling laws: scaling" in report and "| alpha (N exponent) |" in report
    assert "6 points over 3 sizes and 2 budgets, each the mean of 2 seeds" in report
    assert "alignpipe run recipes/default.yaml --set model.init.hidden_size=" in report
    for name in ("loss_curves", "isoflop", "contours"):
        assert (stage.parent / f"fig-scaling_{name}.png").stat().st_size > 10_000
