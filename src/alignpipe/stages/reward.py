"""Reward model: a scalar score learned from preference pairs (chosen vs rejected), TRL's RewardTrainer.

Starts `from:` a causal-LM stage (normally SFT): its body is kept and a one-output score head is added
(AutoModelForSequenceClassification, num_labels=1), trained in full or with LoRA (task type SEQ_CLS,
the head trained in full beside the adapter). Pairs are conversational and rendered by the recipe's
chat template. Bad pairs are counted and reported before training.

Metrics, on held-out data: pairwise accuracy, mean margin, calibration (ECE of sigmoid(margin)),
reward-length correlation; and on the parent policy's own sampled responses to held-out prompts,
judged by a verifier (the embedded world's judge, or one named in `eval.judges`): `onpolicy_accuracy` (pass vs
fail, same prompt, ordered correctly) and `judge_auc`; on the embedded world also by what is wrong with the
failing sample (`onpolicy_accuracy_by_failure_type`, `onpolicy_wrong_answer_accuracy`: alignpipe.reward.onpolicy).
Pairs may come from a label stage (`data: {from: label}`, alignpipe.labelling.sources). Those samples also give
`reward_mean` / `reward_std`, the statistics PPO normalises with (its first samples come from this same policy).
Artifact: `alignpipe.reward.artifact`.
"""

from __future__ import annotations

# Heavy imports (trl, datasets, torch; eval.policy (which imports them)) stay inside the functions that use them: the
# CLI starts without them.
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.errors import AlignpipeError, RecipeError
from alignpipe.eval.verifiers import EMBEDDED
from alignpipe.models import loading as modeling
from alignpipe.models.loading import device
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import StageConfig
from alignpipe.reward import metrics as rm_metrics
from alignpipe.reward.artifact import OneOutput, RewardArtifact, load_reward_dir, save_reward_model, score
from alignpipe.reward.onpolicy import failure_metrics
from alignpipe.reward.pairs import filter_pairs
from alignpipe.runtime import distributed, padding_free
from alignpipe.stages.helpers import lora_config, rows
from alignpipe.stages.training import train, train_log_metrics, write_log_history

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext


DEFAULT_MAX_LENGTH = 512  # tokens, or the model's max_position_embeddings when that is less


@dataclass
class Config(StageConfig):
    eval_pairs: int = 200  # at most this many of a user dataset's held-out pairs are scored (the embedded world has its own)
    reload_tolerance: float = 1e-4  # the reloaded artifact must score this close to the trained model (fp32)
    # Padding-free batches (alignpipe.runtime.padding_free): a batch's chosen and rejected sequences in one row, each
    # scored at its last token. null = auto (on a CPU or with flash-attention, when a check on this model finds
    # the flattened forward exact), true/false force it. The manifest says which was used.
    padding_free: bool | None = None


def trainer_config_class():
    from trl import RewardConfig

    return RewardConfig


def check(recipe, name: str, where: str) -> None:
    cfg = recipe.stages[name]
    if not cfg.data:
        raise RecipeError("a reward stage needs preference pairs", where=where, key=f"stages.{name}.data",
                          fix="add `data: {embedded: pairs}` or a file with prompt/chosen/rejected")


def pair_rows(ctx: StageContext, tokenizer, max_length: int) -> tuple[list[dict], list[dict], dict]:
    """Train and held-out pairs, with bad pairs dropped; the drop report is printed and returned."""
    # the recipe's held-out prompts: DPO's training pairs are never this model's held-out pairs
    raw_train, raw_eval = rows(ctx, lambda world: (world.preference_rows("train"), world.preference_rows("eval")),
                               ctx.config.eval_pairs, tokenizer, max_length)
    train, train_report = filter_pairs(raw_train, "train", tokenizer, max_length)
    evals, eval_report = filter_pairs(raw_eval, "held-out", tokenizer, max_length)
    for report in (train_report, eval_report):
        print(f"[alignpipe] stage {ctx.name}: {report.summary()}", flush=True)
    report = {"train": train_report.as_dict(), "eval": eval_report.as_dict()}
    ctx.dir.mkdir(parents=True, exist_ok=True)
    (ctx.dir / "pairs_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return train, evals, report


def build_trainer(ctx):
    """The RewardTrainer, ready to train: the parent's body with a new score head, the pairs, the config."""
    from datasets import Dataset
    from trl import RewardTrainer

    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model(OneOutput)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    args = ctx.trainer_args(trainer_config_class(), max_length=min(DEFAULT_MAX_LENGTH, limit), per_device_train_batch_size=16,
                            per_device_eval_batch_size=64, learning_rate=1e-3, lr_scheduler_type="cosine",
                            warmup_steps=10, max_steps=150)
    train, evals, report = pair_rows(ctx, tokenizer, args.max_length)
    batches = batching(ctx, model)
    collator = padding_free.pair_collator(tokenizer.pad_token_id, batches) if batches.padding_free else None
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train), data_collator=collator,
                            processing_class=tokenizer, peft_config=lora_config(ctx, "SEQ_CLS"))
    if batches.padding_free:  # inert on padded batches (the scoring after training)
        padding_free.score_flat_rows(trainer.model)
    return trainer, evals, report, batches


def batching(ctx, model):
    """Padded or padding-free batches (Config.padding_free); padding-free needs the score head as `score` (the
    head transformers' `...ForSequenceClassification` models pool)."""
    if not hasattr(model, "score") and ctx.config.padding_free is not False:
        return padding_free.Batching(False, f"{type(model).__name__} has no `score` head to pool")
    return padding_free.choose(model, ctx.config.padding_free, ctx.name)


def onpolicy_samples(ctx, tokenizer):
    """The parent policy's sampled responses to the stage's eval prompts with a verifier's verdicts (the embedded
    world's judge, or the first verifier in `eval.judges`); None without eval prompts or a verifier."""
    from alignpipe.eval.policy import judged_samples

    return judged_samples(ctx, lambda: ctx.load_model().to(device()), tokenizer)


def judged_by_world(ctx: StageContext) -> bool:
    """Whether the on-policy check's verifier is the embedded world's judge (embedded data or exported files)."""
    from alignpipe.eval.policy import judges_of

    verifiers = [j.verifier for j in judges_of(ctx).values() if not j.pairwise]
    return bool(verifiers) and verifiers[0] == EMBEDDED


def run(ctx: StageContext) -> dict:
    import torch

    from alignpipe.eval.policy import write_samples

    trainer, evals, report, batches = build_trainer(ctx)
    tokenizer = trainer.processing_class
    threads = train(trainer, ctx, choose_threads=True)
    write_log_history(trainer, ctx.dir / "train_log.jsonl")
    metrics = {**train_log_metrics(trainer), **threads, "parameters": modeling.count_parameters(trainer.model),
               "pairs_train": report["train"]["kept"], "pairs_truncated": report["train"]["truncated"],
               "pairs_heldout": report["eval"]["kept"], "pairs_dropped": sum(report["train"]["dropped"].values()),
               "pairs_dropped_by_reason": report["train"]["dropped"], **batches.manifest()}

    # --- held-out pairs, scored by the model as trained (LoRA: adapter active)
    model = distributed.gathered(trainer.model).eval()  # FSDP: whole tensors, to score and save
    trained = RewardArtifact(model, tokenizer, 0.0, 1.0)
    prompts = [p["prompt"] for p in evals]
    chosen = score(trained, prompts, [p["chosen"] for p in evals])
    rejected = score(trained, prompts, [p["rejected"] for p in evals])
    lengths = [[len(ids) for ids in _response_ids(tokenizer, evals, side)] for side in ("chosen", "rejected")]
    pair_figures, table = rm_metrics.pair_metrics(chosen, rejected, *lengths)
    metrics.update(pair_figures)

    # --- the parent's own samples, judged: what PPO will feel (needs a verifier: the embedded world's judge,
    # or one in eval.judges)
    stats_scores = chosen + rejected
    stats_on = "eval_pairs"
    judged = onpolicy_samples(ctx, tokenizer) if ctx.config.eval.enabled else None
    if judged is not None:
        samples, passed = judged
        sample_scores = score(trained, samples.prompt_messages, samples.responses)  # as sampled: cut to fit
        metrics.update(rm_metrics.judged_metrics(samples.prompts, sample_scores, passed, samples.lengths))
        if judged_by_world(ctx):  # the failure types are the world's house style
            metrics.update(failure_metrics(samples.prompts, samples.responses, samples.ended, passed, sample_scores))
        write_samples(ctx.dir / "eval_samples.jsonl", samples, passed, {"reward": sample_scores})
        stats_scores, stats_on = sample_scores, "parent_samples"
    mean = sum(stats_scores) / len(stats_scores)
    std = max(1e-6, (sum((s - mean) ** 2 for s in stats_scores) / len(stats_scores)) ** 0.5)
    metrics.update(reward_mean=mean, reward_std=std, reward_stats_on=stats_on)

    # --- save, reload fresh, and check that the artifact scores what the trained model scored
    # (one process writes the artifact; the others read it only once it is whole: a reader racing the writer of
    # model/ found no weights file)
    if distributed.is_main_process():
        save_reward_model(ctx.dir, model, tokenizer, {"mean": mean, "std": std, "stats_on": stats_on,
                                                      "lora": ctx.config.lora is not None})
    distributed.barrier()
    fresh = load_reward_dir(ctx.model_dir, ctx.recipe.model)
    again = score(fresh, prompts, [p["chosen"] for p in evals])
    drift = max(abs(a - b) for a, b in zip(chosen, again))
    metrics["reload_max_abs_diff"] = drift
    tolerance = ctx.config.reload_tolerance
    if next(fresh.model.parameters()).dtype != torch.float32:  # bf16 keeps ~3 digits; a LoRA merge rounds
        tolerance = max(tolerance, 0.02 * max(1.0, max(abs(s) for s in chosen)))
    if drift > tolerance:
        raise AlignpipeError(f"the saved reward model scores differently from the trained one (max diff {drift:.3g})",
                             where=str(ctx.model_dir), fix="report this as a bug; the artifact cannot be trusted")
    (ctx.dir / "reward_eval.json").write_text(json.dumps({"calibration": table, "pairs": report}, indent=2) + "\n")
    return metrics


def _response_ids(tokenizer, pairs: list[dict], side: str) -> list[list[int]]:
    """Tokens of each pair's response text (for the reward-length correlation)."""
    texts = ["".join(m["content"] for m in p[side]) for p in pairs]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


DECLARES = (StageKind("reward", Config, run, trainer_config_class, family="pairs", embedded="pairs", policy=False,
                      scorer=True, user_split=True, max_length=DEFAULT_MAX_LENGTH, check=check),)
