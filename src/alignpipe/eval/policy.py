"""The evaluation every policy stage shares: sample responses to held-out prompts, then measure them.

Sampling (temperature 1.0 by default), not greedy, so the figures describe the policy's distribution; a
fixed seed and a fixed number of samples per prompt make them reproducible and comparable across stages.
`evaluate_stage` is the one entry point, the same for the embedded world and a user's own model and data:
response health (`eval.health`), KL to the reference (the parent), the recipe's reward model (mean score,
win rates against the parent and against sft, bootstrap intervals over prompts), each judge named in
`eval.judges` (verifiers: pass rate; pairwise judge models: win rate against the parent) and lm-eval tasks.
The embedded world is one instance: its held-out prompts are the eval prompts and its judge (`judge`, a
verifier) is the world's ground truth, which no trained model ever sees.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignpipe.errors import AlignpipeError, EvalError
from alignpipe.eval.attacks import attack_metrics
from alignpipe.eval.budget import batch_bytes, budget_bytes, fit_prompts, plan_batches, prompt_budget
from alignpipe.eval.contamination import manifest_figures
from alignpipe.eval.health import health_metrics
from alignpipe.eval.independence import below_chance, optimised_judges
from alignpipe.eval.judges import judge_model, judging_prompt, load_verifier, pairwise, pairwise_metrics, run_verifier
from alignpipe.eval.lm_eval import run_lm_eval
from alignpipe.eval.safety import capability_metrics, safety_metrics
from alignpipe.eval.selection import checked_eval_prompts, eval_prompts
from alignpipe.eval.stats import bootstrap_rate, outcome, paired, win_rate
from alignpipe.eval.tools import tool_metrics
from alignpipe.eval.verifiers import EMBEDDED
from alignpipe.recipe.dataspec import world_part
from alignpipe.recipe.kinds import kind_of, references
from alignpipe.recipe.schema import JudgeSpec
from alignpipe.reward.artifact import load_reward_model, score
from alignpipe.runfolder.files import read_jsonl, write_jsonl_atomic
from alignpipe.runfolder.manifests import is_complete, read_manifest
from alignpipe.runtime.progress import track


@dataclass
class Samples:
    prompts: list[str]  # user message per sample (repeated samples_per_prompt times)
    responses: list[str]
    ended: list[bool]  # the response emitted end-of-turn within max_new_tokens
    lengths: list[int]  # response tokens
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    prompt_index: list[int] = field(default_factory=list)  # which of the given prompts each sample answers
    prompt_messages: list[list[dict]] = field(default_factory=list)  # the prompt as sampled (cut to fit)
    cut: int = 0  # prompts cut from the left to fit the model's context
    skipped: int = 0  # prompts that could not fit, not sampled


def render_prompts(tokenizer, user_messages: list) -> list[str]:
    """Each prompt (a user message, or a conversation ending with the user's turn) through the chat template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": m}] if isinstance(m, str) else m,
                                          tokenize=False, add_generation_prompt=True) for m in user_messages]


def _user_text(m) -> str:
    if isinstance(m, str):
        return m
    users = [t["content"] for t in m if t["role"] == "user"]
    return users[-1] if users else ""


def unwrapped(model):
    """(the model to call, the context to call it in): a LoRA run's reference (`rl.policy.AdapterOff`) is its
    peft model with the adapter disabled; any other model is itself."""
    inner = getattr(model, "peft_model", None)
    if inner is not None and not hasattr(model, "config"):
        return inner, inner.disable_adapter()
    return model, contextlib.nullcontext()


def as_messages(m) -> list[dict]:
    return [{"role": "user", "content": m}] if isinstance(m, str) else list(m)


@torch.no_grad()
def sample(model, tokenizer, user_messages: list, n: int, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, batch_size: int = 128, batch_memory_mb: float | None = None,
           greedy: bool = False, stage: str = "") -> Samples:
    """`n` sampled responses per prompt (one greedy response with `greedy`), with the KV cache. Prompts are
    cut from the left to fit the model's context less `max_new_tokens`, or skipped (`eval.budget`); batches
    hold at most `batch_size` sequences and fit `batch_memory_mb`."""
    model, context = unwrapped(model)
    with context:
        return _sample(model, tokenizer, user_messages, n, max_new_tokens, temperature, top_p, seed, batch_size,
                       batch_memory_mb, greedy, stage)


def _sample(model, tokenizer, user_messages: list, n: int, max_new_tokens: int, temperature: float, top_p: float,
            seed: int, batch_size: int, batch_memory_mb: float | None, greedy: bool, stage: str) -> Samples:

    n = 1 if greedy else n
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    fitted = fit_prompts(tokenizer, [as_messages(m) for m in user_messages], prompt_budget(model, max_new_tokens))
    if (line := fitted.line(stage)) is not None:
        print(line, flush=True)
    kept = [i for i, m in enumerate(fitted.prompts) if m is not None]
    texts = render_prompts(tokenizer, [fitted.prompts[i] for i in kept])
    widths = [len(ids) + max_new_tokens for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] \
        if texts else []
    weight_bytes = next(model.parameters()).element_size()
    batches = plan_batches(widths, lambda seqs, w: batch_bytes(model.config, seqs, w, weight_bytes=weight_bytes),
                           budget_bytes(model, batch_memory_mb), batch_size, per_item=n)
    eos = tokenizer.eos_token_id
    out = Samples([], [], [], [], [], [], cut=fitted.cut, skipped=fitted.skipped)
    gen = torch.Generator().manual_seed(seed)
    how = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    for lo, hi in track(batches, "sampling greedily" if greedy else "sampling", unit="sample",
                        weight=lambda b: (b[1] - b[0]) * n):
        enc = tokenizer(texts[lo:hi], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False)
        enc = {k: v.to(dev) for k, v in enc.items()}
        # one seed per batch, drawn from our own generator, so results do not depend on global RNG state
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        generated = model.generate(**enc, **how, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                   use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        new = generated[:, enc["input_ids"].shape[1]:].tolist()
        prompt_rows = enc["input_ids"].repeat_interleave(n, dim=0).tolist()
        mask_rows = enc["attention_mask"].repeat_interleave(n, dim=0).tolist()
        for i, ids in enumerate(new):
            ended = eos in ids
            ids = ids[: ids.index(eos) + 1] if ended else ids
            which = kept[lo + i // n]
            out.prompts.append(_user_text(user_messages[which]))
            out.prompt_index.append(which)
            out.prompt_messages.append(fitted.prompts[which])
            out.responses.append(tokenizer.decode(ids, skip_special_tokens=True))
            out.ended.append(ended)
            out.lengths.append(len(ids))
            out.prompt_ids.append([t for t, m in zip(prompt_rows[i], mask_rows[i]) if m])
            out.response_ids.append(ids)
    model.train(was_training)
    return out


def write_samples(path: Path, samples: Samples, passed: list[bool], extra: dict[str, list] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i, (p, r) in enumerate(zip(samples.prompts, samples.responses)):
            row = {"prompt": p, "response": r, "judge": passed[i], "ended": samples.ended[i],
                   "tokens": samples.lengths[i]}
            for k, col in (extra or {}).items():
                row[k] = col[i]
            fh.write(json.dumps(row) + "\n")


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                      batch_size: int = 64, batch_memory_mb: float | None = None) -> list[list[float]]:
    """Per-token log-probabilities of each response given its prompt (right-padded batches of at most
    `batch_size` sequences, sized to fit `batch_memory_mb` with every position's logits)."""

    dev = next(model.parameters()).device
    config = unwrapped(model)[0].config
    widths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    batches = plan_batches(widths, lambda seqs, w: batch_bytes(config, seqs, w, every_logit=True),
                           budget_bytes(model, batch_memory_mb), batch_size)
    out: list[list[float]] = []
    for s, e in batches:
        rows = [p + r for p, r in zip(prompt_ids[s:e], response_ids[s:e])]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
        del logits
        for i, (p, r) in enumerate(zip(prompt_ids[s:e], response_ids[s:e])):
            out.append(logp[i, len(p) - 1: len(p) - 1 + len(r)].tolist())
    return out


def kl_to_reference(policy, reference, samples: Samples, pad_id: int, batch_memory_mb: float | None = None) -> float:
    """Monte-Carlo KL(policy || reference) in nats per response, from the policy's own samples:
    the sum over response tokens of log pi(y_t) - log ref(y_t), averaged over samples."""
    lp = sequence_logprobs(policy, samples.prompt_ids, samples.response_ids, pad_id, batch_memory_mb=batch_memory_mb)
    lr = sequence_logprobs(reference, samples.prompt_ids, samples.response_ids, pad_id,
                           batch_memory_mb=batch_memory_mb)
    per_seq = [sum(a) - sum(b) for a, b in zip(lp, lr)]
    return sum(per_seq) / max(1, len(per_seq))


def reward_stage_of(recipe, stage: str) -> str | None:
    """The reward stage whose scores a policy stage reports: its own `reward_model`, else the recipe's
    first complete reward stage."""


    own = references(recipe.stages[stage]).get("reward_model")
    if own:
        return own
    for name, cfg in recipe.stages.items():
        if kind_of(cfg.kind).scorer and is_complete(recipe.stage_dir(name)):
            return name
    return None




# --- the one evaluation of a policy stage -------------------------------------------------------------

SAMPLES_FILE = "eval_samples.jsonl"


def judges_of(ctx) -> dict[str, JudgeSpec]:
    """The stage's judges: `eval.judges`, with the embedded world's judge as verifier `judge` for embedded data."""

    judges = dict(ctx.config.eval.judges)

    if world_part(ctx.config.data) and "judge" not in judges:  # also the world mixed with labelled pairs
        judges = {"judge": JudgeSpec(verifier=EMBEDDED), **judges}
    return judges


def judged_samples(ctx, load_policy, tokenizer) -> tuple[Samples, list[bool]] | None:
    """Samples of the policy `load_policy()` on the stage's eval prompts, judged by its first verifier (a response
    cut off before end-of-turn fails; a float verdict passes at 0.5): the reward stage's on-policy check. None
    when the stage has no eval prompts or no verifier (nothing is loaded then)."""

    verifiers = [(n, j) for n, j in judges_of(ctx).items() if not j.pairwise]
    if not verifiers:
        return None
    rows = eval_prompts(ctx)
    if not rows:
        return None
    name, j = verifiers[0]
    fn = load_verifier(j.verifier, str(ctx.recipe.path), f"stages.{ctx.name}.eval.judges.{name}.verifier")
    spec = ctx.config.eval
    samples = sample(load_policy(), tokenizer, [r["prompt"] for r in rows], spec.samples_per_prompt,
                     spec.max_new_tokens, spec.temperature, spec.top_p, ctx.seed, spec.batch_size,
                     spec.batch_memory_mb, stage=ctx.name)
    values = run_verifier(fn, samples.prompts, samples.responses, [rows[i] for i in samples.prompt_index],
                          samples.ended)
    return samples, [float(v) >= 0.5 for v in values]


def sft_stage_of(recipe, stage: str) -> str | None:
    """The nearest baseline ancestor of `stage` (an sft stage, following `from`): the `rm_win_rate_vs_sft` one."""

    parent = recipe.stages[stage].from_
    while parent:
        if kind_of(recipe.stages[parent].kind).baseline:
            return parent
        parent = recipe.stages[parent].from_
    return None


def read_samples(stage_dir: Path | None) -> list[dict]:
    path = Path(stage_dir) / SAMPLES_FILE if stage_dir else None
    return read_jsonl(path, missing_ok=True) if path is not None else []


def covers(rows: list[dict], samples: Samples, n: int) -> bool:
    """Do saved samples hold at least `n` samples of every prompt `samples` answers?"""

    have = Counter(r["prompt"] for r in rows)
    return bool(rows) and all(have[p] >= n for p in set(samples.prompts))


def evaluate_stage(ctx, policy, tokenizer, reference=None) -> dict:
    """Every policy stage's evaluation (see the module docstring). The stage's model is saved before this
    runs; a failure here (a judge that does not answer) is recorded as `eval_status: failed` with one line,
    the stage still completes, and `alignpipe eval runs/<recipe>/<stage>` re-runs only the evaluation."""
    if not ctx.config.eval.enabled:
        return {}
    if ctx.await_stage is not None and (rm_stage := reward_stage_of(ctx.recipe, ctx.name)) is not None:
        ctx.await_stage(rm_stage)  # trained beside it; outside the try: one that missed its gate stops this stage
    try:
        return _evaluate(ctx, policy, tokenizer, reference)
    except Exception as err:  # noqa: BLE001 - the trained stage is kept whatever its evaluation did

        line = err.one_line() if isinstance(err, AlignpipeError) else f"{type(err).__name__}: {err}"
        line = " ".join(line.split())
        print(f"[alignpipe] stage {ctx.name}: evaluation failed: {line}; the trained model is saved; re-run only "
              f"the evaluation with: alignpipe eval {ctx.dir}", flush=True)
        return {"eval_status": "failed", "eval_error": line}


def _evaluate(ctx, policy, tokenizer, reference) -> dict:
    """Sample, then measure: health and KL, the parent's samples and its greedy answers beside each row, the
    verifiers, the reward model, the pairwise judges; the rows go to `eval_samples.jsonl`."""
    spec = ctx.config.eval
    rows, contaminated, dropped = checked_eval_prompts(ctx)
    if not rows:
        print(f"[alignpipe] stage {ctx.name}: no held-out prompts to evaluate on (set eval.prompts)", flush=True)
        return {"eval_status": "skipped: no held-out prompts"}

    def draw(model, greedy: bool = False) -> Samples:
        return sample(model, tokenizer, [r["prompt"] for r in rows], spec.samples_per_prompt, spec.max_new_tokens,
                      spec.temperature, spec.top_p, ctx.seed, spec.batch_size, spec.batch_memory_mb, greedy=greedy,
                      stage=ctx.name)

    samples = draw(policy)
    out = _sample_rows(samples)
    if not out:
        raise EvalError(f"none of the {len(rows)} eval prompts fits the model's context", key="eval.prompts",
                        fix="give shorter prompts, or lower eval.max_new_tokens")
    metrics: dict = {"eval_status": "complete", "eval_prompts": len(rows), "eval_samples": len(out),
                     "eval_prompts_cut": samples.cut, "eval_prompts_skipped": samples.skipped,
                     **(manifest_figures(contaminated, dropped) if contaminated else {}),
                     **health_metrics(samples.responses, samples.response_ids, samples.ended)}
    if reference is not None:
        metrics["kl_to_reference"] = kl_to_reference(policy, reference, samples, tokenizer.pad_token_id,
                                                     spec.batch_memory_mb)
    with_parent = _pair_with_parent(ctx, out, samples, draw, reference, metrics)
    with_greedy = _pair_with_greedy_parent(ctx, out, draw, reference, metrics)
    judges = judges_of(ctx)
    _verify(ctx, judges, out, samples, [rows[i] for i in samples.prompt_index], with_parent, with_greedy, metrics)
    rm_stage = reward_stage_of(ctx.recipe, ctx.name)
    metrics.update(independence_metrics(ctx, rm_stage))
    if rm_stage is not None:
        _reward_model_scores(ctx, rm_stage, out, samples, with_parent, with_greedy, metrics)
    _pairwise_judges(ctx, judges, with_parent, with_greedy, metrics)
    metrics.update(capability_metrics(ctx, out, judges))  # did it hurt? (eval.safety)
    write_jsonl_atomic(ctx.dir / SAMPLES_FILE, out)
    metrics.update(safety_metrics(ctx, policy, tokenizer, sample))
    metrics.update(attack_metrics(ctx, policy, tokenizer, [_user_text(r["prompt"]) for r in rows],
                                  lambda model, prompts: draw_greedy(ctx, model, tokenizer, prompts)))
    if spec.lm_eval is not None and spec.lm_eval.tasks:
        metrics.update(run_lm_eval(ctx, policy, tokenizer, spec.lm_eval))
    if ctx.recipe.tools and ctx.kind.chat:  # tool-call figures with the recipe's tools executed (eval/tools.py)
        metrics.update(tool_metrics(ctx, policy, tokenizer))
    return metrics


def draw_greedy(ctx, model, tokenizer, prompts: list) -> Samples:
    """One greedy answer per prompt, with the stage's eval settings (the data-attack figures)."""
    spec = ctx.config.eval
    return sample(model, tokenizer, prompts, 1, spec.max_new_tokens, seed=ctx.seed, batch_size=spec.batch_size,
                  batch_memory_mb=spec.batch_memory_mb, greedy=True, stage=ctx.name)


def _sample_rows(samples: Samples) -> list[dict]:
    """One row per sample: prompt, response, whether it ended its turn, its tokens."""
    return [{"prompt": p, "response": r, "ended": e, "tokens": t}
            for p, r, e, t in zip(samples.prompts, samples.responses, samples.ended, samples.lengths)]


def _pair_with_parent(ctx, out: list[dict], samples: Samples, draw, reference, metrics: dict) -> list[dict]:
    """Each row's k-th partner among the parent's samples of the same prompt (`parent_response`); returns the
    rows that have one. The parent's samples: its own file when it covers the prompts, else drawn now from the
    reference (which is the parent), with the same protocol and seed."""
    parent, how = read_samples(ctx.parent_dir), "its saved samples"
    if not covers(parent, samples, ctx.config.eval.samples_per_prompt):
        parent, how = [], None
        if reference is not None:
            parent, how = _sample_rows(draw(reference)), "sampled now"
    if parent:
        metrics["eval_parent"] = f"{ctx.config.from_ or 'the recipe model'} ({how})"
    parent_by_prompt: dict[str, list[dict]] = {}
    for r in parent:
        parent_by_prompt.setdefault(r["prompt"], []).append(r)
    k_of: dict[str, int] = {}
    for row in out:  # this row's k-th partner in the parent's samples
        k = k_of[row["prompt"]] = k_of.get(row["prompt"], -1) + 1
        theirs = parent_by_prompt.get(row["prompt"], [])
        if k < len(theirs):
            row["parent_response"], row["parent_ended"] = theirs[k]["response"], bool(theirs[k].get("ended", True))
    return [r for r in out if "parent_response" in r]


def _pair_with_greedy_parent(ctx, out: list[dict], draw, reference, metrics: dict) -> list[dict]:
    """The parent made colder: one greedy answer per prompt, the partner of each of this stage's samples, so a
    gain that is only sharpening (a colder policy) shows as no gain against it (`greedy_parent`)."""
    started = time.perf_counter()
    with_greedy = greedy_parent(ctx, reference, draw, out)
    if with_greedy:
        metrics["eval_greedy_parent"] = f"{ctx.config.from_ or 'the recipe model'} (greedy, one answer per prompt)"
        metrics["eval_greedy_parent_wall_s"] = round(time.perf_counter() - started, 2)
    return with_greedy


def _verify(ctx, judges: dict, out: list[dict], samples: Samples, eval_rows: list[dict], with_parent: list[dict],
            with_greedy: list[dict], metrics: dict) -> None:
    """The verifier judges: pass rates of this stage's samples, and win rates against the parent's samples and
    against the parent's greedy answers."""
    where = str(ctx.recipe.path)
    for name, j in judges.items():
        if j.pairwise:
            continue
        fn = load_verifier(j.verifier, where, f"stages.{ctx.name}.eval.judges.{name}.verifier")
        values = run_verifier(fn, samples.prompts, samples.responses, eval_rows, samples.ended)
        total = sum(float(v) for v in values)
        metrics[f"{name}_pass_rate"] = total / len(values)
        metrics[f"{name}_passed"] = int(total) if all(isinstance(v, bool) for v in values) else total
        metrics[f"{name}_total"] = len(values)
        for row, v in zip(out, values):
            row[name] = v
        for partner, paired_rows in (("parent", with_parent), ("greedy_parent", with_greedy)):
            if paired_rows:
                _verify_partner(fn, name, partner, out, eval_rows)
                _win(metrics, f"{name}_win_rate_vs_{partner}", paired_rows, name, f"{partner}_{name}", ctx.seed)


def _verify_partner(fn, name: str, partner: str, out: list[dict], eval_rows: list[dict]) -> None:
    """The verifier's verdict on each row's partner response (`parent` or `greedy_parent`), as `<partner>_<name>`."""
    idx = [i for i, r in enumerate(out) if f"{partner}_response" in r]
    theirs = run_verifier(fn, [out[i]["prompt"] for i in idx], [out[i][f"{partner}_response"] for i in idx],
                          [eval_rows[i] for i in idx], [out[i][f"{partner}_ended"] for i in idx])
    for i, v in zip(idx, theirs):
        out[i][f"{partner}_{name}"] = v


def _reward_model_scores(ctx, rm_stage: str, out: list[dict], samples: Samples, with_parent: list[dict],
                         with_greedy: list[dict], metrics: dict) -> None:
    """The recipe's reward model: mean score; win rates against the parent, its greedy answers and sft. Prompts
    are scored as they were sampled (cut to fit)."""
    artifact = load_reward_model(ctx.stage_dir(rm_stage), ctx.recipe.model)
    as_sampled = dict(zip(samples.prompts, samples.prompt_messages))

    def scores(prompts: list[str], responses: list[str]) -> list[float]:
        return score(artifact, [as_sampled.get(p, p) for p in prompts], responses)

    for row, s in zip(out, scores(samples.prompts, samples.responses)):
        row["reward"] = s
    metrics["mean_reward"] = sum(r["reward"] for r in out) / len(out)
    metrics["reward_stage"] = rm_stage
    # which reward model it was (its inputs' fingerprint): `alignpipe compare` sets scores side by side only when equal
    metrics["reward_stage_fingerprint"] = (read_manifest(ctx.stage_dir(rm_stage)) or {}).get("fingerprint")
    if with_parent:
        for row, s in zip(with_parent, scores([r["prompt"] for r in with_parent],
                                              [r["parent_response"] for r in with_parent])):
            row["parent_reward"] = s
        _win(metrics, "rm_win_rate_vs_parent", with_parent, "reward", "parent_reward", ctx.seed)
    if with_greedy:
        once = {r["prompt"]: r["greedy_parent_response"] for r in with_greedy}  # one greedy answer a prompt
        by_prompt = dict(zip(once, scores(list(once), list(once.values()))))
        for row in with_greedy:
            row["greedy_parent_reward"] = by_prompt[row["prompt"]]
        _win(metrics, "rm_win_rate_vs_greedy_parent", with_greedy, "reward", "greedy_parent_reward", ctx.seed)
    _reward_win_rate_vs_sft(ctx, out, samples, scores, metrics)


def _reward_win_rate_vs_sft(ctx, out: list[dict], samples: Samples, scores, metrics: dict) -> None:
    """`rm_win_rate_vs_sft`: the parent's when the parent is the sft stage, else against sft's saved samples."""
    sft = sft_stage_of(ctx.recipe, ctx.name)
    if sft is not None and sft == ctx.config.from_ and "rm_win_rate_vs_parent" in metrics:
        metrics["rm_win_rate_vs_sft"] = metrics["rm_win_rate_vs_parent"]
        metrics["rm_win_rate_vs_sft_ci"] = metrics["rm_win_rate_vs_parent_ci"]
    elif sft is not None and covers(base := read_samples(ctx.stage_dir(sft)), samples,
                                    ctx.config.eval.samples_per_prompt):
        scored = [{**r, "reward": s} for r, s in zip(base, scores([r["prompt"] for r in base],
                                                                  [r["response"] for r in base]))]
        win = win_rate(paired(out, scored), "reward", seed=ctx.seed)
        if win["rate"] is not None:
            metrics["rm_win_rate_vs_sft"], metrics["rm_win_rate_vs_sft_ci"] = win["rate"], [win["lo"], win["hi"]]


def _pairwise_judges(ctx, judges: dict, with_parent: list[dict], with_greedy: list[dict], metrics: dict) -> None:
    """Pairwise judge models: this stage's response against the parent's, both orders; and against the parent's
    greedy answer."""
    for name, j in judges.items():
        if not j.pairwise:
            continue
        if not with_parent:
            metrics[f"{name}_status"] = "skipped: no parent samples of the same prompts"
            continue
        model, template = judge_model(j, ctx.recipe.model), judging_prompt(j, ctx.recipe.path)
        verdicts = pairwise(model, template, [r["prompt"] for r in with_parent], [r["response"] for r in with_parent],
                            [r["parent_response"] for r in with_parent])
        for row, v in zip(with_parent, verdicts):
            row[f"{name}_vs_parent"], row[f"{name}_answers"] = v.score(), [v.first, v.second]
        metrics.update(pairwise_metrics(name, [r["prompt"] for r in with_parent], verdicts, ctx.seed))
        if with_greedy:
            verdicts = pairwise(model, template, [r["prompt"] for r in with_greedy], [r["response"] for r in with_greedy],
                                [r["greedy_parent_response"] for r in with_greedy])
            for row, v in zip(with_greedy, verdicts):
                row[f"{name}_vs_greedy_parent"] = v.score()
            greedy = pairwise_metrics(name, [r["prompt"] for r in with_greedy], verdicts, ctx.seed)
            for key in (f"{name}_win_rate_vs_parent", f"{name}_win_rate_vs_parent_ci"):
                if key in greedy:
                    metrics[key.replace("_vs_parent", "_vs_greedy_parent")] = greedy[key]


def greedy_parent(ctx, reference, draw, out: list[dict]) -> list[dict]:
    """The rows of `out` given their prompt's greedy answer by the parent (`greedy_parent_response`,
    `greedy_parent_ended`): for RL and preference stages (aligned kinds) with the parent as reference."""
    if reference is None or not ctx.kind.aligned:
        return []
    drawn = draw(reference, greedy=True)
    answer = {p: (r, e) for p, r, e in zip(drawn.prompts, drawn.responses, drawn.ended)}
    for row in out:
        if row["prompt"] in answer:
            row["greedy_parent_response"], row["greedy_parent_ended"] = answer[row["prompt"]]
    return [r for r in out if "greedy_parent_response" in r]


def independence_metrics(ctx, rm_stage: str | None) -> dict:
    """`optimised_judges` ({judge: why}: the judges this stage optimised, `rm` its reward model;
    `eval.independence`) and `reward_model_below_chance` (the reward model's accuracy on its own held-out
    pairs, when it is no better than chance), each said in one line."""

    out: dict = {}
    optimised = optimised_judges(ctx.recipe, ctx.name, rm_stage)
    if optimised:
        out["optimised_judges"] = optimised
    if rm_stage is not None:
        accuracy = ((read_manifest(ctx.stage_dir(rm_stage)) or {}).get("metrics") or {}).get("pairwise_accuracy")
        if below_chance(accuracy):
            out["reward_model_below_chance"] = accuracy
            print(f"[alignpipe] stage {ctx.name}: reward model `{rm_stage}` ranked only {accuracy:.1%} of its own "
                  "held-out pairs right (chance: 50%): its scores of this stage are not evidence", flush=True)
    return out


def _win(metrics: dict, name: str, rows: list[dict], mine: str, theirs: str, seed: int) -> None:
    """`name` and `name_ci` from rows holding both columns (k-th sample against the parent's k-th)."""

    per_prompt: dict[str, list[float]] = {}
    for r in rows:
        per_prompt.setdefault(r["prompt"], []).append(outcome(float(r[mine]), float(r[theirs])))
    win = bootstrap_rate(per_prompt, seed)
    if win["rate"] is not None:
        metrics[name], metrics[f"{name}_ci"] = win["rate"], [win["lo"], win["hi"]]
