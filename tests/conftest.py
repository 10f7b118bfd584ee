"""Shared fixtures: tiny recipes that train for real in seconds on one CPU thread, a trained tiny base to copy,
a tiny model in hub layout, and the manifest reader. Tests that train a model are marked `slow`
(`make test-fast` leaves them out)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a busy neighbour core made 2-thread steps ~170x slower
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("ALIGNPIPE_THREADS", None)  # tests train on one thread (thread_choice's tests set it themselves)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
# trackio reads its folder once, at import: set before any test can import it, so no test writes to ~/.cache;
# the folder made here goes when the session ends (512 were left in /tmp after a day of runs)
if "TRACKIO_DIR" not in os.environ:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="alignpipe-tests-trackio-")
    atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)

import torch  # noqa: E402

from alignpipe.runfolder.manifests import read_manifest  # noqa: E402 - the package's own reader; tests import it from here

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# A small world and a tiny model: enough to check behaviour, not quality.
TINY_WORLD = {"n_corpus_docs": 400, "n_corpus_eval_docs": 40, "n_sft": 200, "n_pairs": 120, "n_eval_pairs": 40,
              "n_eval_prompts": 16, "n_rl_prompts": 64}
TINY_MODEL = {"init": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
                       "num_attention_heads": 2, "vocab_size": 300, "max_position_embeddings": 128}}
TINY_EVAL = {"num_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 12}


def tiny_recipe(runs_dir: Path, name: str = "tiny", extra_stages: dict | None = None, **top) -> dict:
    recipe = {
        "name": name,
        "seed": 0,
        "runs_dir": str(runs_dir),
        "model": TINY_MODEL,
        "chat_template": "embedded",
        "world": dict(TINY_WORLD),
        "stages": {
            "pretrain": {"data": {"embedded": "corpus"}, "block_size": 32, "eval": TINY_EVAL,
                         "trainer": {"max_steps": 80, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                                     "warmup_steps": 0, "logging_steps": 5}},
            "sft": {"from": "pretrain", "data": {"embedded": "sft"}, "eval": TINY_EVAL,
                    "trainer": {"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                                "warmup_steps": 0, "logging_steps": 2}},
        },
    }
    recipe["stages"].update(extra_stages or {})
    recipe.update(top)
    return recipe


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    """Path of a tiny pretrain+sft recipe whose runs go under tmp_path/runs."""
    return write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs"))


def stage_manifest(stage_dir: Path) -> dict:
    """A stage folder's manifest, read as the package reads it; fails naming the folder when there is none."""
    manifest = read_manifest(Path(stage_dir))
    assert manifest is not None, f"no readable manifest.json in {stage_dir}"
    return manifest


@pytest.fixture(scope="session")
def tiny_hub_model(tmp_path_factory) -> Path:
    """A random-weight qwen2 look-alike (~40k parameters) and its tokenizer in hub layout, built once per session.
    Shared by every test that asks for it: copy it before changing it."""
    from hub_layout import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("hub") / "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The run folder `runs/tiny` of `tiny_recipe` with pretrain and sft complete, trained once per session.
    Never change it: `copy_base` gives each user a copy."""
    from alignpipe.cli import main

    root = tmp_path_factory.mktemp("tiny-base")
    assert main(["run", str(write_yaml(root / "tiny.yaml", tiny_recipe(root / "runs")))]) == 0
    return root / "runs" / "tiny"


def copy_base(base: Path, runs_dir: Path, name: str = "tiny") -> Path:
    """A copy of the trained base as `runs_dir/name`: a tiny recipe of that name and runs_dir, with the base's
    pretrain and sft unchanged, skips them (same config and inputs) and trains only its other stages."""
    shutil.copytree(base, Path(runs_dir) / name)
    return Path(runs_dir) / name
