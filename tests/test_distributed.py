"""Two processes on CPU (gloo DDP), launched the way `make dpo ACCELERATE=recipes/accelerate/ddp.yaml NPROC=2`
launches them: sft (full fine-tuning) then dpo (LoRA) on the tiny hub-layout model. Each rank dumps a hash
of its parameters after training; both ranks must hold the same model, wrapped in DDP, in a world of 2.

(`accelerate launch --cpu --num_processes 2` would silently start ONE process; the ddp config's
MULTI_GPU type starts two, with gloo when there is no GPU.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from alignpipe.runfolder.manifests import read_manifest
from conftest import REPO, write_yaml
from hub_layout import save_tiny_model
from test_real_models import real_recipe

pytestmark = pytest.mark.slow  # every test here trains a model


ACCELERATE_DIR = REPO / "recipes" / "accelerate"


def make_command(target: str, recipe: Path, nproc: int, config: str = "ddp.yaml") -> list[str]:
    """The command `make <target> RECIPE=... ACCELERATE=recipes/accelerate/<config> NPROC=...` runs."""
    out = subprocess.run(["make", "-n", target, f"RECIPE={recipe}", f"ACCELERATE=recipes/accelerate/{config}",
                          f"NPROC={nproc}"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "accelerate launch" in x)
    return shlex.split(line)


def test_makefile_launches_through_accelerate(tmp_path):
    cmd = make_command("sft", tmp_path / "r.yaml", 8)
    assert cmd[0].endswith(".venv/bin/accelerate") and cmd[1] == "launch"
    assert cmd[cmd.index("--config_file") + 1] == "recipes/accelerate/ddp.yaml"
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[-4:] == ["run", str(tmp_path / "r.yaml"), "--stages", "sft"]


@pytest.mark.parametrize("name,kind", [("single_gpu", "NO"), ("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                       ("fsdp_cpu", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE_DIR / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == kind
    # precision is alignpipe's choice (bf16 on a GPU that has it), never forced by the launcher
    assert config.mixed_precision == "no"
    assert path.read_text().startswith("# make ")  # headed by the command that uses it
    raw = yaml.safe_load(path.read_text())
    if kind == "FSDP":
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # model/ loads like any other
    if kind == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] == 3 and raw["deepspeed_config"]["zero3_save_16bit_model"]


def test_two_process_ddp_sft_then_dpo(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    recipe = real_recipe(tmp_path, model_dir, ["sft", "dpo"])
    del recipe["stages"]["sft"]["lora"]  # full fine-tuning for sft, LoRA for dpo: both kinds of DDP model
    path = write_yaml(tmp_path / "ddp.yaml", recipe)
    sums = tmp_path / "checksums"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNPIPE_DEBUG_PARAM_CHECKSUM": str(sums),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    t0 = time.time()
    proc = subprocess.run(make_command("dpo", path, 2), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"2-process sft+dpo: {elapsed:.1f}s")

    runs = tmp_path / "runs" / "real"
    for stage, steps in (("sft", 6), ("dpo", 4)):
        ranks = [json.loads((sums / f"{stage}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["world_size"] == 2 and r["wrapped_as"] == "DistributedDataParallel" for r in ranks), ranks
        assert all(r["global_step"] == steps for r in ranks)
        assert ranks[0]["checksum"] == ranks[1]["checksum"], f"{stage}: the ranks hold different models"
        manifest = read_manifest(runs / stage)
        assert manifest["status"] == "complete" and manifest["world_size"] == 2
    # the two stages trained different things: the checksums moved from sft to dpo
    assert json.loads((sums / "sft-rank0.json").read_text())["checksum"] != \
        json.loads((sums / "dpo-rank0.json").read_text())["checksum"]
    # the fully fine-tuned sft model stops at the end of a turn wherever it is loaded next
    tok_config = json.loads((runs / "sft" / "model" / "tokenizer_config.json").read_text())
    generation = json.loads((runs / "sft" / "model" / "generation_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    im_end = json.loads((runs / "sft" / "model" / "config.json").read_text())["eos_token_id"]
    assert im_end in (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list)
                      else [generation["eos_token_id"]])
    # one process logs and writes; the process group was torn down (no exit-time warning)
    assert proc.stderr.count("[alignpipe] stage dpo: complete") == 1
    assert proc.stdout.count("stage  kind") == 1  # one summary table
    assert "destroy_process_group" not in proc.stderr
    assert not list(runs.rglob(".manifest.json.tmp-*"))
