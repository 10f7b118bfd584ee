"""The work of the GPU check (benchmarks/gpu_check.py): its settings, the data files, the model and the recipe.

One place for every number both sides share: alignpipe's recipe and the plain TRL baseline (gpu_trl.py) read
the same `Settings`, the same files and the same model folder, so their sft and dpo steps are the same work.

The data are generated, not downloaded (the GPU machine has no network): conversations, preference pairs and
prompts made of pseudo-words, of lengths spread up to about `max_length`, so that
batches carry padding as real data do and some rows are truncated. The tokenizer is trained on those words
(each word is about one token); the model has the real shape's vocabulary, so the LM head costs what it costs
on the real model.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "po", "se", "du", "fa", "gi", "ho", "ju", "be")


@dataclass(frozen=True)
class Settings:
    shape: str  # alignpipe.models.tiny.SHAPES
    batch: int  # sft: conversations per step; reward, dpo: pairs per step
    max_length: int  # tokens per sequence (sft, reward, dpo)
    steps: dict  # optimiser steps of sft, reward, dpo, grpo
    rows: int  # conversations and pairs written (each side holds out or trains on these)
    prompts: int  # RL prompts written
    tokenizer_vocab: int
    lora: dict = field(default_factory=lambda: {"r": 16, "alpha": 32, "dropout": 0.0})
    learning_rate: float = 1e-4
    skip_steps: int = 3  # first steps left out of the steady tokens/s (kernel selection, allocator warm-up)
    grpo: dict = field(default_factory=lambda: {"num_generations": 4, "per_device_train_batch_size": 8,
                                                "max_completion_length": 48})
    ppo: dict = field(default_factory=lambda: {"total_updates": 6, "rollout_batch_size": 16, "minibatch_size": 8,
                                               "forward_batch_size": 16, "ppo_epochs": 1, "max_new_tokens": 48})
    eval: dict = field(default_factory=lambda: {"num_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 48})
    dpo: dict = field(default_factory=lambda: {"beta": 0.1, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 2.0],
                                               "precompute_ref_log_probs": True})
    # per side's process: with the model build (~10 s), the whole check stays under 8 minutes whatever happens
    timeout_s: dict = field(default_factory=lambda: {"alignpipe": 300, "trl": 120})

    def as_dict(self) -> dict:
        return asdict(self)


# On one GPU: Qwen2.5-0.5B's shape, batches of 8 x 512 tokens, a few dozen steps each; well under 8 minutes
# on an H100 by the probe's rates (scripts/gpu_lora_probe.py), most of it model loading and generation.
GPU = Settings(shape="qwen2.5-0.5b", batch=8, max_length=512, steps={"sft": 40, "reward": 30, "dpo": 40, "grpo": 8},
               rows=400, prompts=128, tokenizer_vocab=2000)
# The dry run (--cpu, the tests): the same code path at the tiny shape, a few steps each.
CPU = Settings(shape="tiny", batch=4, max_length=64, steps={"sft": 4, "reward": 3, "dpo": 4, "grpo": 2},
               rows=48, prompts=16, tokenizer_vocab=2000, lora={"r": 4, "alpha": 8, "dropout": 0.0}, skip_steps=1,
               grpo={"num_generations": 2, "per_device_train_batch_size": 4, "max_completion_length": 8},
               ppo={"total_updates": 2, "rollout_batch_size": 4, "minibatch_size": 4, "forward_batch_size": 4,
                    "ppo_epochs": 1, "max_new_tokens": 8},
               eval={"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8},
               timeout_s={"alignpipe": 600, "trl": 300})


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def question(rng: random.Random, n_words: int) -> tuple[str, int]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"{words(rng, n_words)} What is {a} plus {b}?", a + b


def write_data(folder: Path, s: Settings, seed: int = 0) -> dict[str, str]:
    """sft.jsonl (messages), pairs.jsonl (prompt / chosen / rejected), prompts.jsonl and eval_prompts.jsonl
    (prompt), all under `folder`. Lengths in words (~1.25 tokens each with the check's tokenizer): a prompt of up
    to a fifth of max_length, an answer of up to six tenths, so a prompt and its answer reach max_length only now
    and then (sft truncates such a row, both sides alike; the reward stage drops such a pair and says so)."""
    rng = random.Random(seed)
    longest_prompt, longest_answer = max(4, s.max_length // 5), max(4, s.max_length * 6 // 10)
    files = {name: folder / f"{name}.jsonl" for name in ("sft", "pairs", "prompts", "eval_prompts")}
    sft, pairs = [], []
    for _ in range(s.rows):
        q, total = question(rng, rng.randint(2, longest_prompt))
        answer = f"{words(rng, rng.randint(2, longest_answer))} The answer is {total}."
        wrong = f"{words(rng, rng.randint(2, longest_answer))} Maybe {total + rng.randint(1, 9)}."
        sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
        pairs.append({"prompt": q, "chosen": answer, "rejected": wrong})
    prompts = [{"prompt": question(rng, rng.randint(2, longest_prompt // 2))[0]} for _ in range(s.prompts)]
    held = [{"prompt": question(rng, rng.randint(2, longest_prompt // 2))[0]} for _ in range(s.eval["num_prompts"])]
    for name, rows in (("sft", sft), ("pairs", pairs), ("prompts", prompts), ("eval_prompts", held)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: str(v) for k, v in files.items()}


def tokenizer_texts(seed: int = 1) -> list[str]:
    """What the tokenizer is trained on: the pseudo-words, numbers and the phrases of the data."""
    rng = random.Random(seed)
    return [f"{question(rng, 40)[0]} The answer is {rng.randint(0, 100)}. Maybe {rng.randint(0, 100)}."
            for _ in range(2000)]


def build_model(folder: Path, s: Settings) -> str:
    """`alignpipe tiny-model --like qwen2 --shape SHAPE`'s folder (hub layout, random weights), its tokenizer
    trained on the data's words."""
    from alignpipe.models.tiny import save_tiny_model

    save_tiny_model(folder, like="qwen2", texts=tokenizer_texts(), vocab_size=s.tokenizer_vocab, shape=s.shape)
    return str(folder)


def recipe(s: Settings, files: dict[str, str], model_dir: str, runs_dir: str, dtype: str = "auto") -> dict:
    """alignpipe's recipe of the check: LoRA sft, reward, dpo, grpo and ppo, each policy stage evaluated on a
    few held-out prompts (scored by the reward stage). `dtype` is the model's (auto: bf16 on a GPU)."""
    lora = dict(s.lora)
    common = {"per_device_train_batch_size": s.batch, "max_length": s.max_length, "learning_rate": s.learning_rate,
              "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 5}
    ev = {"prompts": files["eval_prompts"], **s.eval}
    stages = {
        "sft": {"data": {"path": files["sft"]}, "lora": lora, "eval": ev,
                "trainer": {**common, "max_steps": s.steps["sft"]}},
        "reward": {"from": "sft", "data": {"path": files["pairs"]}, "lora": lora, "eval_pairs": 32,
                   "trainer": {**common, "max_steps": s.steps["reward"]}},
        "dpo": {"from": "sft", "reward_model": "reward", "data": {"path": files["pairs"]}, "lora": lora, "eval": ev,
                "trainer": {**common, **s.dpo, "max_steps": s.steps["dpo"]}},
        "grpo": {"kind": "grpo", "from": "sft", "reward_model": "reward", "data": {"path": files["prompts"]},
                 "lora": lora, "eval": ev,
                 "trainer": {"learning_rate": s.learning_rate, "max_steps": s.steps["grpo"], "logging_steps": 1,
                             **s.grpo}},
        "ppo": {"from": "sft", "reward_model": "reward", "data": {"path": files["prompts"]}, "lora": lora, "eval": ev,
                "trainer": {"learning_rate": s.learning_rate, **s.ppo}},
    }
    return {"name": "gpucheck", "seed": 0, "runs_dir": runs_dir, "model": {"path": model_dir, "dtype": dtype},
            "chat_template": "chatml", "tracking": [], "stages": stages}
