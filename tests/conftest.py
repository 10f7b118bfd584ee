"""Shared fixtures: tiny recipes that train for real in seconds on one CPU thread."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a busy neighbour core made 2-thread steps ~170x slower
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("ALIGNPIPE_THREADS", None)  # tests train on one thread (thread_choice's tests set it themselves)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
# trackio reads its folder once, at import: set before any test can import it, so no test writes to ~/.cache
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="alignpipe-tests-trackio-"))

import torch  # noqa: E402

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
