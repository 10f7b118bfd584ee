"""Supervised fine-tuning on conversations: TRL's SFTTrainer with assistant-only loss.

The chat template marks assistant turns with `{% generation %}`, so only the assistant's tokens are
trained on. Optional packing and LoRA. Metrics: held-out loss and the shared evaluation (`evaluate_stage`).
"""

from __future__ import annotations

# Heavy imports (trl, datasets, torch, transformers) stay inside the functions that use them: the CLI starts without
# them.
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.data.formats import DataError
from alignpipe.data.loading import as_user_error
from alignpipe.data.sft_tokens import needs_own_tokens, tokenize_rows
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import StageConfig
from alignpipe.runtime.padding_free import Batching, choose, sft_collator
from alignpipe.stages import training
from alignpipe.stages.helpers import evaluate_policy, lora_config, rows
from alignpipe.stages.training import train, train_log_metrics, write_log_history

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext


DEFAULT_MAX_LENGTH = 128  # tokens per sequence unless the recipe's trainer.max_length says otherwise


@dataclass
class Config(StageConfig):
    # TRL computes the loss through its fused, chunked LM head (no [tokens, vocab] logits: the memory saver for
    # large vocabularies on a GPU). On a CPU it is the slow part of a small model's step (make bench: ~13 of
    # ~57 ms on the peer model), so there the model's own head and loss are used. true/false force either.
    fused_lm_head: bool | None = None
    # Padding-free batches (alignpipe.runtime.padding_free): TRL tokenizes and truncates the rows as for padded batches,
    # then each batch is laid end to end in one row. null = auto (on a CPU or with flash-attention, when a check
    # on this model finds the flattened forward exact), true/false force it. The manifest says which was used.
    padding_free: bool | None = None


def trainer_config_class():
    from trl import SFTConfig

    return SFTConfig


def conversations(ctx: StageContext, tokenizer=None, max_length: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) `{"messages": [...]}` rows: the embedded world's demonstrations, or a user dataset
    split by the recipe's held-out prompts (its report counts tokens after the chat template, and truncations
    at `max_length`, when given the tokenizer)."""
    # held-out loss: house-style answers to the held-out prompts
    return rows(ctx, lambda world: (world.sft_rows(), world.sft_eval_rows()), 200, tokenizer, max_length)


def datasets(train_rows: list[dict], eval_rows: list[dict], tokenizer, args):
    """TRL's train and eval datasets. Rows with tools, tool calls or loss_weight-0 turns are tokenized here,
    both splits alike (`alignpipe.data.sft_tokens`): TRL then builds its labels from our `assistant_masks`, and
    its `assistant_only_loss` (which refuses tokenized rows) is switched off, the masks doing its work."""
    from datasets import Dataset

    if not needs_own_tokens(train_rows + eval_rows):
        return Dataset.from_list(train_rows), Dataset.from_list(eval_rows)
    args.assistant_only_loss = False
    return Dataset.from_list(tokenize_rows(train_rows, tokenizer)), Dataset.from_list(tokenize_rows(eval_rows, tokenizer))


def plain_head_trainer():
    """SFTTrainer whose loss is the model's own (full logits, cross-entropy on the labels the collator masked),
    with TRL's entropy / token-accuracy metrics computed from those logits. Same loss, same metrics."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class PlainHeadSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            with torch.no_grad():
                logits, labels = outputs.logits[:, :-1], inputs["labels"][:, 1:]
                mask = labels != -100
                logp = torch.log_softmax(logits[mask].float(), dim=-1)
                valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
                entropy = self.accelerator.gather_for_metrics(-(logp.exp() * logp).sum()).sum()
                correct = self.accelerator.gather_for_metrics((logp.argmax(-1) == labels[mask]).sum()).sum()
                self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
                if mode == "train":  # padding-free batches have no mask and no pad tokens
                    real = inputs["attention_mask"].sum() if "attention_mask" in inputs else (labels.new_tensor(
                        inputs["input_ids"].numel()))
                    tokens = self.accelerator.gather_for_metrics(real).sum().item()
                    self._total_train_tokens += tokens
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return PlainHeadSFTTrainer


def batching(ctx, model, args):
    """Padded or padding-free batches (Config.padding_free). TRL's own packing / padding_free (trainer block)
    keep TRL's collator."""
    if args.packing or args.padding_free:
        return Batching(True, "TRL's packing / padding_free in the trainer block")
    return choose(model, ctx.config.padding_free, ctx.name)


def trainer_class(ctx, args):
    """TRL's SFTTrainer, or the plain-head one (see Config.fused_lm_head). TRL's own packed / padding-free
    batches keep TRL's path."""
    import torch
    from trl import SFTTrainer

    fused = ctx.config.fused_lm_head
    if fused is None:
        fused = torch.cuda.is_available() or args.packing or args.padding_free
    return SFTTrainer if fused else plain_head_trainer()


def run(ctx: StageContext) -> dict:
    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    args = ctx.trainer_args(trainer_config_class(), assistant_only_loss=True, max_length=DEFAULT_MAX_LENGTH,
                            per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=1e-3,
                            lr_scheduler_type="cosine", warmup_steps=10, max_steps=300)
    train_rows, eval_rows = conversations(ctx, tokenizer, args.max_length)
    try:
        train_ds, eval_ds = datasets(train_rows, eval_rows, tokenizer, args)
    except DataError as err:
        raise as_user_error(err, str(ctx.recipe.path)) from None
    batches = batching(ctx, model, args)
    collator = None
    if batches.padding_free and not (args.packing or args.padding_free):
        collator = sft_collator(tokenizer, args, batches)
    trainer = trainer_class(ctx, args)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                       processing_class=tokenizer, peft_config=lora_config(ctx, "CAUSAL_LM"),
                                       data_collator=collator)
    threads = train(trainer, ctx, choose_threads=True)
    write_log_history(trainer, ctx.dir / "train_log.jsonl")

    metrics = {**train_log_metrics(trainer), "eval_loss": trainer.evaluate()["eval_loss"], **batches.manifest(),
               **threads}
    # save first (LoRA: the adapter), then evaluate the model that was saved
    training.save_stage_model(trainer, tokenizer, ctx.model_dir)
    model = trainer.model
    metrics.update(evaluate_policy(ctx, model, tokenizer))
    return metrics


DECLARES = (StageKind("sft", Config, run, trainer_config_class, family="conversations", embedded="sft",
                      assistant_loss=True, baseline=True, user_split=True, max_length=DEFAULT_MAX_LENGTH),)
