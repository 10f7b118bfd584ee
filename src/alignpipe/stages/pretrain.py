"""Pretraining: next-token prediction on plain text, packed into fixed-length blocks.

From scratch (`model.init`): trains a byte-level BPE tokenizer on the corpus first, with the chat
template's special tokens, then builds a small Llama. From a hub id / folder: continued pretraining
with that model's tokenizer. Metrics: held-out perplexity beside a unigram baseline's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alignpipe.recipe import StageConfig


@dataclass
class Config(StageConfig):
    block_size: int = 64  # tokens per packed training block
    eval_docs: int = 500  # held-out documents used for perplexity


def trainer_config_class():
    from transformers import TrainingArguments

    return TrainingArguments


def pack(docs: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenate tokenised documents (each ending in EOS) and cut into full blocks; the tail is dropped."""
    flat = [t for d in docs for t in d]
    return [flat[i: i + block_size] for i in range(0, len(flat) - block_size + 1, block_size)]


def unigram_perplexity(train_blocks: list[list[int]], eval_blocks: list[list[int]], vocab_size: int) -> float:
    """Perplexity of a unigram model (add-one smoothed token frequencies) on the held-out blocks."""
    counts = [1] * vocab_size
    for b in train_blocks:
        for t in b:
            counts[t] += 1
    total = sum(counts)
    nll = [-math.log(counts[t] / total) for b in eval_blocks for t in b[1:]]  # same tokens the LM predicts
    return math.exp(sum(nll) / len(nll))


def load_texts(ctx, split: str) -> list[str]:
    """Plain-text documents from the stage's data: the embedded world, or a file in `text` format."""
    spec = ctx.config.data
    if spec.get("embedded") == "corpus":
        world = ctx.world
        return world.corpus() if split == "train" else world.corpus_eval()[: ctx.config.eval_docs]
    from alignpipe.data.loading import load_family

    rows = load_family(ctx, "text")
    texts = [r["text"] for r in rows]
    n_eval = min(ctx.config.eval_docs, max(1, len(texts) // 20))
    return texts[n_eval:] if split == "train" else texts[:n_eval]


def run(ctx) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer

    from alignpipe import modeling
    from alignpipe.templates import EMBEDDED_SPECIAL_TOKENS
    from alignpipe.training import (attach_progress, last_checkpoint, save_stage_model, train_log_metrics,
                                    write_log_history)

    recipe = ctx.recipe
    train_texts, eval_texts = load_texts(ctx, "train"), load_texts(ctx, "eval")

    # --- tokenizer and model
    if recipe.model.init is not None:
        tokenizer = modeling.train_tokenizer(train_texts, recipe.model.init.vocab_size, EMBEDDED_SPECIAL_TOKENS,
                                             ctx.chat_template or "")
        model = modeling.build_model(recipe.model.init, tokenizer)
    else:
        tokenizer = ctx.load_tokenizer()
        model = ctx.load_model()

    # --- data: every document ends in EOS, then everything is packed into blocks
    def encode(texts):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return pack([d + [tokenizer.eos_token_id] for d in ids], ctx.config.block_size)

    train_blocks, eval_blocks = encode(train_texts), encode(eval_texts)
    train_ds = Dataset.from_dict({"input_ids": train_blocks})

    # --- train
    args = ctx.trainer_args(trainer_config_class(), per_device_train_batch_size=32, learning_rate=3e-3,
                            lr_scheduler_type="cosine", warmup_steps=30, weight_decay=0.0, max_steps=600)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    attach_progress(trainer, ctx)
    trainer.train(resume_from_checkpoint=last_checkpoint(ctx))
    write_log_history(trainer, ctx.dir / "train_log.jsonl")
    model = trainer.model

    # --- evaluate: held-out perplexity vs. a unigram baseline; and the judge (a base model should fail it)
    model.eval()
    with torch.no_grad():
        losses = []
        dev = next(model.parameters()).device
        for i in range(0, len(eval_blocks), 64):
            batch = torch.tensor(eval_blocks[i: i + 64], device=dev)
            losses.append(model(input_ids=batch, labels=batch).loss.item() * len(batch))
    eval_loss = sum(losses) / len(eval_blocks)
    metrics = {
        "perplexity": math.exp(eval_loss),
        "unigram_perplexity": unigram_perplexity(train_blocks, eval_blocks, len(tokenizer)),
        "eval_loss": eval_loss,
        "train_tokens": len(train_blocks) * ctx.config.block_size,
        "parameters": modeling.count_parameters(model),
        **train_log_metrics(trainer),
    }
    if ctx.config.eval.enabled and "embedded" in ctx.config.data:
        from alignpipe.evaluation import evaluate_policy

        judged, _ = evaluate_policy(model, tokenizer, ctx.world, ctx.config.eval, ctx.seed, ctx.dir)
        metrics.update(judged)

    save_stage_model(trainer, tokenizer, ctx.model_dir)
    return metrics
