"""Pretraining: next-token prediction on plain text, packed into fixed-length blocks.

From scratch (`model.init`): trains a byte-level BPE tokenizer on the corpus first, with the chat
template's special tokens, then builds a small Llama. From a hub id / folder: continued pretraining
with that model's tokenizer. Metrics: held-out perplexity beside a unigram baseline's.
"""

from __future__ import annotations

# Heavy imports (transformers, torch, datasets) stay inside the functions that use them: the CLI starts without them.
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.models import loading as modeling
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import StageConfig
from alignpipe.recipe.templates import template_special_tokens
from alignpipe.stages import training
from alignpipe.stages.helpers import evaluate_policy, pack, rows
from alignpipe.stages.training import train, train_log_metrics, write_log_history

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext


@dataclass
class Config(StageConfig):
    block_size: int = 64  # tokens per packed training block
    eval_docs: int = 500  # held-out documents used for perplexity


def trainer_config_class():
    from transformers import TrainingArguments

    return TrainingArguments


def unigram_perplexity(train_blocks: list[list[int]], eval_blocks: list[list[int]], vocab_size: int) -> float:
    """Perplexity of a unigram model (add-one smoothed token frequencies) on the held-out blocks."""
    counts = [1] * vocab_size
    for b in train_blocks:
        for t in b:
            counts[t] += 1
    total = sum(counts)
    nll = [-math.log(counts[t] / total) for b in eval_blocks for t in b[1:]]  # same tokens the LM predicts
    return math.exp(sum(nll) / len(nll))


def block_collator(rows: list[dict]) -> dict:
    """A batch of packed blocks, all full length: every token is a label, EOS included. (transformers'
    language-modelling collator masks the pad token's id, and many base models pad with EOS: continued
    pretraining would never learn where a document ends.)"""
    import torch

    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def load_texts(ctx: StageContext) -> tuple[list[str], list[str]]:
    """(train, held-out) plain-text documents: the embedded world, or a user file split by the recipe's seeded
    held-out hash (never the first rows of a possibly sorted file)."""
    train, held = rows(ctx, lambda world: ([{"text": t} for t in world.corpus()],
                                           [{"text": t} for t in world.corpus_eval()[: ctx.config.eval_docs]]),
                       ctx.config.eval_docs)
    return [r["text"] for r in train], [r["text"] for r in held]


def run(ctx: StageContext) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Trainer


    recipe = ctx.recipe
    train_texts, eval_texts = load_texts(ctx)

    # --- tokenizer and model
    if recipe.model.init is not None:
        # the recipe's template's own special tokens (chatml, llama3, a file), so every later stage can use it
        specials, bos = template_special_tokens(ctx.chat_template)
        tokenizer = modeling.train_tokenizer(train_texts, recipe.model.init.vocab_size, specials,
                                             ctx.chat_template or "", bos)
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
                      data_collator=block_collator)
    threads = train(trainer, ctx, choose_threads=True)
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
        **threads,
    }
    if ctx.config.eval.enabled and ("embedded" in ctx.config.data or ctx.config.eval.prompts):
        metrics.update(evaluate_policy(ctx, model, tokenizer))

    training.save_stage_model(trainer, tokenizer, ctx.model_dir)
    return metrics


DECLARES = (StageKind("pretrain", Config, run, trainer_config_class, family="text", embedded="corpus", chat=False,
                      user_split=True),)
