"""The one reward-model report, for a scorer of any kind (a generative reward model, the implicit reward of a DPO
stage, ...): the figures the reward kind reports, computed the same way, so the report sets them side by side.

Held-out pairs: pairwise accuracy, mean margin, calibration (ECE of sigmoid(margin)), reward-length correlation
(alignpipe.reward.metrics). The parent policy's own samples on the stage's eval prompts, judged by its verifier:
on-policy accuracy, judge AUC and, when the verifier is the embedded world's judge, the accuracy by failure type
with the wrong-answer slice (alignpipe.reward.onpolicy). reward_mean / reward_std of the samples' scores (else of
the held-out pairs'), the statistics PPO normalises with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignpipe.reward import metrics as rm_metrics
from alignpipe.reward.artifact import score
from alignpipe.reward.onpolicy import failure_metrics

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext


def response_lengths(tokenizer, pairs: list[dict], side: str) -> list[int]:
    texts = ["".join(m["content"] for m in p[side]) if not isinstance(p[side], str) else p[side] for p in pairs]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def scorer_report(ctx: StageContext, scorer, evals: list[dict], tokenizer) -> tuple[dict, list[dict], list[float]]:
    """(metrics, calibration table, the held-out chosen responses' scores) of `scorer` on `evals` (held-out pairs)
    and, when the stage evaluates, on its parent's judged samples."""
    from alignpipe.eval.policy import write_samples
    from alignpipe.models.loading import device
    from alignpipe.stages.reward import judged_by_world, onpolicy_samples

    prompts = [p["prompt"] for p in evals]
    chosen = score(scorer, prompts, [p["chosen"] for p in evals])
    rejected = score(scorer, prompts, [p["rejected"] for p in evals])
    metrics, table = rm_metrics.pair_metrics(chosen, rejected, response_lengths(tokenizer, evals, "chosen"),
                                             response_lengths(tokenizer, evals, "rejected"))
    stats_scores, stats_on = chosen + rejected, "eval_pairs"
    judged = None
    if ctx.config.eval.enabled:
        judged = onpolicy_samples(ctx, tokenizer)
        scorer.model.to(device())
    if judged is not None:
        samples, passed = judged
        sample_scores = score(scorer, samples.prompt_messages, samples.responses)
        metrics.update(rm_metrics.judged_metrics(samples.prompts, sample_scores, passed, samples.lengths))
        if judged_by_world(ctx):
            metrics.update(failure_metrics(samples.prompts, samples.responses, samples.ended, passed, sample_scores))
        write_samples(ctx.dir / "eval_samples.jsonl", samples, passed, {"reward": sample_scores})
        stats_scores, stats_on = sample_scores, "parent_samples"
    mean = sum(stats_scores) / len(stats_scores)
    std = max(1e-6, (sum((s - mean) ** 2 for s in stats_scores) / len(stats_scores)) ** 0.5)
    metrics.update(reward_mean=mean, reward_std=std, reward_stats_on=stats_on)
    return metrics, table, chosen
