"""Supervised fine-tuning on conversations: TRL's SFTTrainer with assistant-only loss.

The chat template marks assistant turns with `{% generation %}`, so only the assistant's tokens are
trained on. Optional packing and LoRA. Metrics: held-out loss and the judge's pass rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignpipe.recipe import StageConfig


@dataclass
class Config(StageConfig):
    # TRL computes the loss through its fused, chunked LM head (no [tokens, vocab] logits: the memory saver for
    # large vocabularies on a GPU). On a CPU it is the slow part of a small model's step (make bench: ~13 of
    # ~57 ms on the peer model), so there the model's own head and loss are used. true/false force either.
    fused_lm_head: bool | None = None


def trainer_config_class():
    from trl import SFTConfig

    return SFTConfig


def lora_config(ctx, task_type: str):
    """The stage's peft LoraConfig, or None for full fine-tuning."""
    spec = ctx.config.lora
    if spec is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
                      modules_to_save=spec.modules_to_save, task_type=task_type)


def conversations(ctx, split: str, tokenizer=None, max_length: int | None = None) -> list[dict]:
    """`{"messages": [...]}` rows: the embedded world's demonstrations, or a user dataset (whose report
    counts tokens after the chat template, and truncations at `max_length`, when given the tokenizer)."""
    if ctx.config.data.get("embedded") == "sft":
        world = ctx.world
        if split == "train":
            return world.sft_rows()
        # held-out loss: house-style answers to the held-out prompts
        return [{"messages": [{"role": "user", "content": p["prompt"]},
                              {"role": "assistant", "content": f"The answer is {p['answer']}."}]}
                for p in world.eval_prompts()]
    from alignpipe.data.loading import load_family

    rows = load_family(ctx, "conversations", tokenizer, max_length)
    n_eval = min(200, max(1, len(rows) // 20))
    return rows[n_eval:] if split == "train" else rows[:n_eval]


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
                if mode == "train":
                    tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                    self._total_train_tokens += tokens
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return PlainHeadSFTTrainer


def trainer_class(ctx, args):
    """TRL's SFTTrainer, or the plain-head one (see Config.fused_lm_head). Packed / padding-free batches carry
    no attention mask and keep TRL's path."""
    import torch
    from trl import SFTTrainer

    fused = ctx.config.fused_lm_head
    if fused is None:
        fused = torch.cuda.is_available() or args.packing or args.padding_free
    return SFTTrainer if fused else plain_head_trainer()


def run(ctx) -> dict:
    from datasets import Dataset

    from alignpipe.evaluation import evaluate_policy
    from alignpipe.training import (attach_progress, last_checkpoint, save_stage_model, train_log_metrics,
                                    write_log_history)

    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    args = ctx.trainer_args(trainer_config_class(), assistant_only_loss=True, max_length=128,
                            per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=1e-3,
                            lr_scheduler_type="cosine", warmup_steps=10, max_steps=300)
    train_ds = Dataset.from_list(conversations(ctx, "train", tokenizer, args.max_length))
    eval_ds = Dataset.from_list(conversations(ctx, "eval", tokenizer, args.max_length))
    trainer = trainer_class(ctx, args)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                       processing_class=tokenizer, peft_config=lora_config(ctx, "CAUSAL_LM"))
    attach_progress(trainer, ctx)
    trainer.train(resume_from_checkpoint=last_checkpoint(ctx))
    write_log_history(trainer, ctx.dir / "train_log.jsonl")

    metrics = {**train_log_metrics(trainer), "eval_loss": trainer.evaluate()["eval_loss"]}
    # save first (LoRA: the adapter), then evaluate the model that was saved
    save_stage_model(trainer, tokenizer, ctx.model_dir)
    model = trainer.model
    if ctx.config.eval.enabled and "embedded" in ctx.config.data:
        judged, _ = evaluate_policy(model, tokenizer, ctx.world, ctx.config.eval, ctx.seed, ctx.dir)
        metrics.update(judged)
    return metrics
