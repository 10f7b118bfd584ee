"""Evaluation along training: a curve point every `eval.every` updates (RL) or steps (TRL stages).

Each point uses the final evaluation's protocol (`eval.policy`: sampled at the eval temperature, the same
seed at every point, on held-out prompts), on a smaller set: the first `eval.curve_prompts` eval prompts,
`eval.curve_samples` samples each. It measures the KL to the reference (nats per response, Monte-Carlo from
the policy's own samples), the proxy (the mean raw score of the reward model the stage trains against or is
scored by) and every verifier judge (pass rates; the gold is the first judge the stage did not optimise).
Pairwise judge models are not measured along training (each point would need a judge model call per
sample); they stay in the final evaluation.

Rows go to the stage folder's `eval_curve.jsonl` (one per point, with per-prompt means so that
`eval.overoptimisation` can bootstrap over prompts), to the console as one line, and to the recipe's
trackers (`curve/...`). Sampling reseeds torch's global generator: a point saves and restores its state,
so a run with curves trains exactly as one without.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from alignpipe.eval.independence import optimised_judges
from alignpipe.eval.stats import wilson
from alignpipe.runfolder.files import read_jsonl, write_jsonl_atomic
from alignpipe.runtime.progress import say
from alignpipe.runtime.tracking import log_metrics

CURVE_FILE = "eval_curve.jsonl"


# the kinds that record curves (their modules call `stages.curves`): eval.every on another kind is an error
CURVE_KINDS = ("ppo", "grpo", "rloo", "dpo", "kto", "orpo", "cpo")


def check_curves(recipe, name: str, where: str) -> None:
    """Validation: `eval.every` is 0 or more, on a kind that records curves; the curve set is not empty."""
    from alignpipe.errors import RecipeError

    spec, kind, key = recipe.stages[name].eval, recipe.stages[name].kind, f"stages.{name}.eval"
    if spec.every < 0 or spec.curve_prompts < 1 or spec.curve_samples < 1:
        raise RecipeError("eval.every must be 0 or more, curve_prompts and curve_samples 1 or more", where=where,
                          key=key, fix="e.g. eval: {every: 5, curve_prompts: 32, curve_samples: 4}")
    if spec.every > 0 and kind not in CURVE_KINDS:
        raise RecipeError(f"a {kind} stage records no curve along training", where=where, key=f"{key}.every",
                          fix=f"remove eval.every (curves: {', '.join(CURVE_KINDS)})")
    gated = [g for g in recipe.stages[name].gates if g.split()[0].startswith(("overoptimised", "overopt_"))]
    if gated and spec.every <= 0:
        raise RecipeError(f"gate {gated[0]!r} reads the curve along training, which this stage does not record",
                          where=where, key=f"stages.{name}.gates", fix="add eval: {every: N}, or remove the gate")


def read_curve(stage_dir: Path) -> list[dict]:
    """The curve rows of a stage folder, by step ([] when it has none)."""
    path = Path(stage_dir) / CURVE_FILE
    return sorted(read_jsonl(path, missing_ok=True), key=lambda r: r["step"]) if path.is_file() else []


def gold_judge(ctx, judges: dict, rm_stage: str | None) -> str | None:
    """The first verifier judge the stage did not optimise: the curve's gold (None: the stage has none)."""
    optimised = optimised_judges(ctx.recipe, ctx.name, rm_stage)
    for name, spec in judges.items():
        if not spec.pairwise and name not in optimised:
            return name
    return None


class CurveRecorder:
    """Measures and records curve points of one stage. `point(step, policy)` every `every` steps;
    `due(step)` says when. Built by `recorder(ctx, ...)`, which returns None when curves are off."""

    def __init__(self, ctx, tokenizer, reference, prompts: list[dict], verifiers: dict, rm_stage: str | None,
                 gold: str | None):
        self.ctx, self.tokenizer, self.reference = ctx, tokenizer, reference
        self.prompts, self.verifiers, self.rm_stage, self.gold = prompts, verifiers, rm_stage, gold
        self.every = ctx.config.eval.every
        self.path = ctx.dir / CURVE_FILE
        self.rows: list[dict] | None = None  # loaded on the first point (a resumed run keeps the earlier ones)
        self._artifact = None

    def due(self, step: int, last: int) -> bool:
        return step == 0 or step == last or step % self.every == 0

    def point(self, step: int, policy) -> dict:
        """Measure the policy at `step`, append the row, say it in one line, log it to the trackers."""
        import torch

        state = torch.get_rng_state()
        started = time.perf_counter()
        was_training = policy.training
        policy.eval()
        try:
            row = self._measure(step, policy)
        finally:
            policy.train(was_training)
            torch.set_rng_state(state)
        row["wall_s"] = round(time.perf_counter() - started, 3)
        self._append(row)
        say(self.line(row))
        log_metrics({f"curve/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                    step=step)
        return row

    def _append(self, row: dict) -> None:
        if self.rows is None:  # first point of this process: drop rows a resumed run will measure again
            self.rows = [r for r in read_curve(self.ctx.dir) if r["step"] < row["step"]]
            write_jsonl_atomic(self.path, self.rows)
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _measure(self, step: int, policy) -> dict:
        from alignpipe.eval.judges import load_verifier, run_verifier
        from alignpipe.eval.policy import kl_to_reference, sample

        spec, ctx = self.ctx.config.eval, self.ctx
        samples = sample(policy, self.tokenizer, [r["prompt"] for r in self.prompts], spec.curve_samples,
                         spec.max_new_tokens, spec.temperature, spec.top_p, ctx.seed, spec.batch_size,
                         spec.batch_memory_mb, stage=ctx.name)
        n = len(samples.responses)
        kl = kl_to_reference(policy, self.reference, samples, self.tokenizer.pad_token_id, spec.batch_memory_mb) \
            if self.reference is not None else None
        row: dict = {"step": step, "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)) if kl is not None else None,
                     "samples": n, "prompts": len(self.prompts), "gold": self.gold,
                     "eot_rate": sum(samples.ended) / max(1, n),
                     "mean_response_tokens": sum(samples.lengths) / max(1, n)}
        per_prompt: dict[str, list] = {}
        rows_of = [self.prompts[i] for i in samples.prompt_index]
        for name, spec_j in self.verifiers.items():
            fn = load_verifier(spec_j.verifier, str(ctx.recipe.path), f"stages.{ctx.name}.eval.judges.{name}.verifier")
            values = [float(v) for v in run_verifier(fn, samples.prompts, samples.responses, rows_of, samples.ended)]
            row[f"{name}_pass_rate"] = sum(values) / max(1, n)
            row[f"{name}_ci"] = list(wilson(round(sum(values)), n))
            per_prompt[name] = _per_prompt(values, samples.prompt_index, len(self.prompts))
        if self.rm_stage is not None:
            scores = self._scores(samples)
            row["proxy"] = sum(scores) / max(1, n)
            row["proxy_source"] = f"reward model `{self.rm_stage}` (raw score)"
            per_prompt["proxy"] = _per_prompt(scores, samples.prompt_index, len(self.prompts))
        row["per_prompt"] = per_prompt
        return row

    def _scores(self, samples) -> list[float]:
        from alignpipe.reward.artifact import load_reward_model, score

        if self._artifact is None:
            self._artifact = load_reward_model(self.ctx.stage_dir(self.rm_stage), self.ctx.recipe.model)
        as_sampled = dict(zip(samples.prompts, samples.prompt_messages))
        return score(self._artifact, [as_sampled.get(p, p) for p in samples.prompts], samples.responses)

    def line(self, row: dict) -> str:
        """`stage ppo: curve at update 10: KL 1.23 nats (sqrt 1.11), proxy 0.452, judge 0.620 [0.55, 0.69]`."""
        parts = [f"KL {row['kl']:.3f} nats (sqrt {row['sqrt_kl']:.3f})"] if row.get("kl") is not None else []
        if "proxy" in row:
            parts.append(f"proxy {row['proxy']:.3f}")
        for name in self.verifiers:
            lo, hi = row[f"{name}_ci"]
            parts.append(f"{name} {row[f'{name}_pass_rate']:.3f} [{lo:.2f}, {hi:.2f}]")
        return f"[alignpipe] stage {self.ctx.name}: curve at step {row['step']}: {', '.join(parts)}"


def _per_prompt(values: list[float], index: list[int], prompts: int) -> list[float | None]:
    """Mean value per prompt, in prompt order (None for a prompt with no sample: it did not fit)."""
    sums, counts = [0.0] * prompts, [0] * prompts
    for v, i in zip(values, index):
        sums[i] += v
        counts[i] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def recorder(ctx, tokenizer, reference) -> CurveRecorder | None:
    """The stage's curve recorder, or None when `eval.every` is 0 or the evaluation is off."""
    from alignpipe.eval.policy import judges_of, reward_stage_of
    from alignpipe.eval.selection import eval_prompts

    spec = ctx.config.eval
    if not spec.enabled or spec.every <= 0:
        return None
    prompts = eval_prompts(ctx)[: spec.curve_prompts]
    if not prompts:
        say(f"[alignpipe] stage {ctx.name}: no held-out prompts: no curve along training")
        return None
    judges = judges_of(ctx)
    verifiers = {n: j for n, j in judges.items() if not j.pairwise}
    rm_stage = reward_stage_of(ctx.recipe, ctx.name)
    return CurveRecorder(ctx, tokenizer, reference, prompts, verifiers, rm_stage, gold_judge(ctx, judges, rm_stage))
