"""FSDP2 on two CPU processes (gloo), launched the way `make dpo RECIPE=... ACCELERATE=recipes/accelerate/fsdp_cpu.yaml
NPROC=2` launches them: sft, reward and dpo (full fine-tuning: what FSDP shards) on the tiny hub-layout model.

Each rank dumps a hash of its (gathered) parameters after training: both ranks trained one FSDP-sharded model,
the `model/` each stage saved loads like any other and holds exactly those parameters, and the losses equal a
single process's on the same global batch (2 x 8 rows against 1 x 16) within a small tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.runfolder.manifests import read_manifest
from alignpipe.runtime.distributed import parameter_checksum
from conftest import REPO, write_yaml
from hub_layout import save_tiny_model
from test_distributed import make_command
from test_real_models import real_recipe

pytestmark = pytest.mark.slow  # every test here trains a model


STAGES = ("sft", "reward", "dpo")


def full_finetuning_recipe(folder: Path, model_dir: Path, runs: str, batch: int) -> Path:
    recipe = real_recipe(folder, model_dir, list(STAGES))
    recipe["runs_dir"] = str(folder / runs)
    for stage in recipe["stages"].values():
        del stage["lora"]
        stage["trainer"]["per_device_train_batch_size"] = batch
    return write_yaml(folder / f"{runs}.yaml", recipe)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same work twice: two FSDP processes with 8 rows each per step, one process with 16."""
    folder = tmp_path_factory.mktemp("fsdp")
    model_dir = save_tiny_model(folder / "model")
    sums = folder / "checksums"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNPIPE_DEBUG_PARAM_CHECKSUM": str(sums),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = make_command("dpo", full_finetuning_recipe(folder, model_dir, "two", 8), 2, "fsdp_cpu.yaml")
    cmd[cmd.index("--stages") + 1] = ",".join(STAGES)  # the make target's command, for all three stages at once
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["run", str(full_finetuning_recipe(folder, model_dir, "one", 16))]) == 0
    return {"two": folder / "two" / "real", "one": folder / "one" / "real", "sums": sums, "proc": proc,
            "model": model_dir}


@pytest.mark.parametrize("stage", STAGES)
def test_two_process_fsdp_trains_saves_and_matches_one_process(runs, stage):
    from alignpipe.models.loading import load_stage_model
    from alignpipe.recipe.schema import ModelSpec
    from alignpipe.reward.artifact import load_reward_dir

    ranks = [json.loads((runs["sums"] / f"{stage}-rank{r}.json").read_text()) for r in (0, 1)]
    # FSDP for real: the model was sharded (DTensor parameters) over a gloo group of 2, not replicated by DDP
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["sharded"] for r in ranks), ranks
    assert all(r["wrapped_as"].startswith("FSDP") for r in ranks), ranks
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["global_step"] == ranks[1]["global_step"]

    two, one = read_manifest(runs["two"] / stage), read_manifest(runs["one"] / stage)
    assert two["status"] == "complete" and two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"]["global_step"] == one["metrics"]["global_step"]
    # same global batch, same rows: the same losses up to float reduction order
    for key in ("train_loss_first", "train_loss"):
        a, b = two["metrics"][key], one["metrics"][key]
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (stage, key, a, b)
    assert two["metrics"]["train_loss"] < two["metrics"]["train_loss_first"]

    # model/ is a whole model that loads like any other, and it is exactly what the ranks trained
    spec = ModelSpec(path=str(runs["model"]))
    if stage == "reward":
        saved = load_reward_dir(runs["two"] / stage / "model", spec).model
    else:
        saved = load_stage_model(runs["two"] / stage, spec)
    assert not any(hasattr(p, "full_tensor") for p in saved.parameters())
    assert parameter_checksum(saved) == ranks[0]["checksum"]


def test_two_process_fsdp_logs_once(runs):
    proc = runs["proc"]
    assert proc.stderr.count("[alignpipe] stage dpo: complete") == 1
    assert proc.stdout.count("stage  ") == 1  # one summary table
    assert "destroy_process_group" not in proc.stderr


def test_fsdp_on_cpu_refuses_lora_before_training(tmp_path, monkeypatch):
    """What `accelerate launch --config_file fsdp_cpu.yaml` sets, and a real LoRA trainer: one clear refusal."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from alignpipe.errors import RecipeError
    from alignpipe.models.loading import load_tokenizer
    from alignpipe.recipe.schema import ModelSpec
    from alignpipe.runtime.distributed import fsdp_on_cpu
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "model")
    tokenizer = load_tokenizer(model_dir, ModelSpec(path=str(model_dir)))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer,
                         args=SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[],
                                        max_steps=1, activation_checkpointing=False),
                         train_dataset=Dataset.from_list([{"messages": [{"role": "user", "content": "1+1?"},
                                                                        {"role": "assistant", "content": "2"}]}]),
                         peft_config=LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match=r"r\.yaml: stages\.sft\.lora: .*full models only.*fix: remove"):
        fsdp_on_cpu(trainer, "r.yaml", "sft")
    assert trainer.state.global_step == 0 and not trainer.is_fsdp_enabled
