"""Generative reward model: the parent policy keeps its language-model head and learns to judge by a verdict token.

Starts `from:` a causal-LM stage (normally SFT). Each preference pair (the same pairs as the reward kind: embedded,
a user file, or a label stage's `data: {from: label}`) is shown to the model as a judging conversation rendered by
the recipe's chat template (alignpipe.reward.generative): the prompt, the response, then "Is that answer right?
Reply Yes or No." with the assistant's turn opened. The score is logit(Yes) - logit(No) there; the loss is
Bradley-Terry on it, -log sigmoid(score(chosen) - score(rejected)), through transformers' Trainer (checkpoints,
resume, logging as every stage). Nothing new is initialised: the verdict is read from what the model already knows
about its answers.

Metrics: the same reward-model report as the reward kind (alignpipe.stages.scorer_report): held-out pairwise
accuracy, margin, calibration; on the parent's own judged samples on-policy accuracy, judge AUC and, on the
embedded world, the wrong-answer slice; reward_mean / reward_std for PPO's normalisation. Artifact:
`alignpipe.reward.generative`; any stage names it as `reward_model: <it>`.
"""

from __future__ import annotations

# Heavy imports (transformers, datasets, torch) stay inside the functions that use them: the CLI starts without them.
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.errors import AlignpipeError, RecipeError
from alignpipe.models import loading as modeling
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import StageConfig
from alignpipe.reward.generative import (JUDGING_QUESTION, NO, YES, GenerativeArtifact, judging_ids,
                                         left_padded, load_generative_dir, save_generative_model, verdict_ids,
                                         verdict_logodds)
from alignpipe.stages.helpers import rows
from alignpipe.stages.scorer_report import scorer_report
from alignpipe.stages.training import train, train_log_metrics, write_log_history

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext

DEFAULT_MAX_LENGTH = 256  # tokens of a judging conversation; longer pairs are dropped and counted


@dataclass
class Config(StageConfig):
    eval_pairs: int = 200  # at most this many of a user dataset's held-out pairs are scored
    question: str = JUDGING_QUESTION  # the judging turn after the response
    yes: str = YES  # the verdict words: the score is logit(first token of yes) - logit(first token of no)
    no: str = NO
    reload_tolerance: float = 1e-4  # the reloaded artifact must score this close to the trained model (fp32)


def trainer_config_class():
    from transformers import TrainingArguments

    return TrainingArguments


def check(recipe, name: str, where: str) -> None:
    cfg = recipe.stages[name]
    if not cfg.data:
        raise RecipeError("a genrm stage needs preference pairs", where=where, key=f"stages.{name}.data",
                          fix="add `data: {embedded: pairs}` or a file with prompt/chosen/rejected")
    if cfg.lora is not None:
        raise RecipeError("a genrm stage trains the whole model (LoRA is not supported here)", where=where,
                          key=f"stages.{name}.lora", fix="remove `lora:` from this stage")


def encoded_pairs(tokenizer, pairs: list[dict], question: str, max_length: int) -> tuple[list[dict], int]:
    """{chosen_ids, rejected_ids} of each pair's judging conversations; pairs longer than max_length are dropped
    and counted."""
    chosen = judging_ids(tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], question)
    rejected = judging_ids(tokenizer, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], question)
    kept = [{"chosen_ids": c, "rejected_ids": r} for c, r in zip(chosen, rejected)
            if len(c) <= max_length and len(r) <= max_length]
    return kept, len(pairs) - len(kept)


def pair_collator(pad: int):
    def collate(features: list[dict]) -> dict:
        ids, mask = left_padded([f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features], pad)
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def verdict_trainer_class():
    """transformers' Trainer with the Bradley-Terry loss on the verdict log-odds (chosen rows first, then rejected)."""
    import torch.nn.functional as F
    from transformers import Trainer

    class VerdictTrainer(Trainer):
        verdict: tuple[int, int] = (0, 0)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scores = verdict_logodds(model, inputs["input_ids"], inputs["attention_mask"], *self.verdict)
            half = scores.shape[0] // 2
            loss = -F.logsigmoid(scores[:half] - scores[half:]).mean()
            return (loss, {"scores": scores}) if return_outputs else loss

    return VerdictTrainer


def build_trainer(ctx: StageContext):
    from datasets import Dataset

    cfg = ctx.config
    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    limit = min(DEFAULT_MAX_LENGTH, getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)
    args = ctx.trainer_args(trainer_config_class(), per_device_train_batch_size=16, learning_rate=1e-4,
                            lr_scheduler_type="cosine", warmup_steps=10, max_steps=200, remove_unused_columns=False)
    raw_train, evals = rows(ctx, lambda world: (world.preference_rows("train"), world.preference_rows("eval")),
                            cfg.eval_pairs, tokenizer, limit)
    train_rows, dropped = encoded_pairs(tokenizer, raw_train, cfg.question, limit)
    if not train_rows:
        raise AlignpipeError(f"no training pair fits {limit} tokens as a judging conversation",
                             where=f"stages.{ctx.name}.data", fix="give shorter pairs")
    if dropped:
        print(f"[alignpipe] stage {ctx.name}: {dropped} of {len(raw_train)} training pairs dropped: longer than "
              f"{limit} tokens as a judging conversation", flush=True)
    trainer = verdict_trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                                      data_collator=pair_collator(tokenizer.pad_token_id), processing_class=tokenizer)
    trainer.verdict = verdict_ids(tokenizer, cfg.yes, cfg.no)
    return trainer, evals, {"pairs_train": len(train_rows), "pairs_dropped": dropped, "pairs_heldout": len(evals)}


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    trainer, evals, counts = build_trainer(ctx)
    tokenizer = trainer.processing_class
    threads = train(trainer, ctx, choose_threads=True)
    write_log_history(trainer, ctx.dir / "train_log.jsonl")
    model = trainer.model.eval()
    trained = GenerativeArtifact(model, tokenizer, 0.0, 1.0, cfg.question, cfg.yes, cfg.no)
    metrics = {**train_log_metrics(trainer), **threads, **counts,
               "parameters": modeling.count_parameters(model), "verdict": [cfg.yes, cfg.no]}
    figures, table, chosen = scorer_report(ctx, trained, evals, tokenizer)
    metrics.update(figures)

    stats = {"mean": metrics["reward_mean"], "std": metrics["reward_std"], "stats_on": metrics["reward_stats_on"],
             "question": cfg.question, "yes": cfg.yes, "no": cfg.no}
    save_generative_model(ctx.dir, model, tokenizer, stats)
    fresh = load_generative_dir(ctx.model_dir, ctx.recipe.model)
    again = fresh.score([p["prompt"] for p in evals], [p["chosen"] for p in evals])
    drift = max(abs(a - b) for a, b in zip(chosen, again))
    metrics["reload_max_abs_diff"] = drift
    if drift > cfg.reload_tolerance:
        raise AlignpipeError(f"the saved generative reward model scores differently from the trained one "
                             f"(max diff {drift:.3g})", where=str(ctx.model_dir),
                             fix="report this as a bug; the artifact cannot be trusted")
    (ctx.dir / "reward_eval.json").write_text(json.dumps({"calibration": table, "pairs": counts}, indent=2) + "\n")
    return metrics


def load_scorer(stage_dir, spec=None):
    return load_generative_dir(modeling.checkpoint_dir(stage_dir), spec)


DECLARES = (StageKind("genrm", Config, run, trainer_config_class, family="pairs", embedded="pairs", policy=False,
                      scorer=True, user_split=True, max_length=DEFAULT_MAX_LENGTH, check=check,
                      reward_loader=load_scorer),)
