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

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignpipe.errors import AlignpipeError
from alignpipe.eval.health import health_metrics
from alignpipe.eval.judges import judge_model, judging_prompt, load_verifier, pairwise, pairwise_metrics, run_verifier
from alignpipe.eval.lm_eval import run_lm_eval
from alignpipe.eval.prompts import eval_prompts
from alignpipe.eval.stats import bootstrap_rate, outcome, paired, win_rate
from alignpipe.eval.verifiers import EMBEDDED
from alignpipe.recipe.dataspec import world_part
from alignpipe.recipe.kinds import kind_of, references
from alignpipe.recipe.schema import JudgeSpec
from alignpipe.reward.artifact import load_reward_model, score
from alignpipe.runfolder.files import read_jsonl, write_jsonl_atomic
from alignpipe.runfolder.manifests import is_complete
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


def render_prompts(tokenizer, user_messages: list) -> list[str]:
    """Each prompt (a user message, or a conversation ending with the user's turn) through the chat template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": m}] if isinstance(m, str) else m,
                                          tokenize=False, add_generation_prompt=True) for m in user_messages]


def _user_text(m) -> str:
    if isinstance(m, str):
        return m
    users = [t["content"] for t in m if t["role"] == "user"]
    return users[-1] if users else ""


@torch.no_grad()
def sample(model, tokenizer, user_messages: list, n: int, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, batch_size: int = 128) -> Samples:
    """`n` sampled responses per prompt, with the KV cache, in batches of `batch_size` sequences."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    texts = render_prompts(tokenizer, user_messages)
    eos = tokenizer.eos_token_id
    out = Samples([], [], [], [], [], [])
    per_batch = max(1, batch_size // n)
    gen = torch.Generator().manual_seed(seed)

    for start in track(range(0, len(texts), per_batch), "sampling", unit="batch"):
        chunk = texts[start:start + per_batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(dev) for k, v in enc.items()}
        # one seed per batch, drawn from our own generator, so results do not depend on global RNG state
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        generated = model.generate(
            **enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
            num_return_sequences=n, use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        )
        new = generated[:, enc["input_ids"].shape[1]:].tolist()
        prompt_rows = enc["input_ids"].repeat_interleave(n, dim=0).tolist()
        mask_rows = enc["attention_mask"].repeat_interleave(n, dim=0).tolist()
        for i, ids in enumerate(new):
            ended = eos in ids
            ids = ids[: ids.index(eos) + 1] if ended else ids
            out.prompts.append(_user_text(user_messages[start + i // n]))
            out.prompt_index.append(start + i // n)
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
                      batch_size: int = 64) -> list[list[float]]:
    """Per-token log-probabilities of each response given its prompt (right-padded batches)."""
    dev = next(model.parameters()).device
    out: list[list[float]] = []
    for s in range(0, len(prompt_ids), batch_size):
        rows = [p + r for p, r in zip(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
        for i, (p, r) in enumerate(zip(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size])):
            out.append(logp[i, len(p) - 1: len(p) - 1 + len(r)].tolist())
    return out


def kl_to_reference(policy, reference, samples: Samples, pad_id: int) -> float:
    """Monte-Carlo KL(policy || reference) in nats per response, from the policy's own samples:
    the sum over response tokens of log pi(y_t) - log ref(y_t), averaged over samples."""
    lp = sequence_logprobs(policy, samples.prompt_ids, samples.response_ids, pad_id)
    lr = sequence_logprobs(reference, samples.prompt_ids, samples.response_ids, pad_id)
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
                     spec.max_new_tokens, spec.temperature, spec.top_p, ctx.seed, spec.batch_size)
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
    try:
        return _evaluate(ctx, policy, tokenizer, reference)
    except Exception as err:  # noqa: BLE001 - the trained stage is kept whatever its evaluation did
        line = err.one_line() if isinstance(err, AlignpipeError) else f"{type(err).__name__}: {err}"
        line = " ".join(line.split())
        print(f"[alignpipe] stage {ctx.name}: evaluation failed: {line}; the trained model is saved; re-run only "
              f"the evaluation with: alignpipe eval {ctx.dir}", flush=True)
        return {"eval_status": "failed", "eval_error": line}


def _evaluate(ctx, policy, tokenizer, reference) -> dict:
    spec = ctx.config.eval
    rows = eval_prompts(ctx)
    if not rows:
        print(f"[alignpipe] stage {ctx.name}: no held-out prompts to evaluate on (set eval.prompts)", flush=True)
        return {"eval_status": "skipped: no held-out prompts"}

    def draw(model) -> Samples:
        return sample(model, tokenizer, [r["prompt"] for r in rows], spec.samples_per_prompt, spec.max_new_tokens,
                      spec.temperature, spec.top_p, ctx.seed, spec.batch_size)

    samples = draw(policy)
    out = _sample_rows(samples)
    metrics: dict = {"eval_status": "complete", "eval_prompts": len(rows), "eval_samples": len(out),
                     **health_metrics(samples.responses, samples.response_ids, samples.ended)}
    if reference is not None:
        metrics["kl_to_reference"] = kl_to_reference(policy, reference, samples, tokenizer.pad_token_id)
    with_parent = _pair_with_parent(ctx, out, samples, draw, reference, metrics)
    judges = judges_of(ctx)
    _verify(ctx, judges, out, samples, [rows[i] for i in samples.prompt_index], with_parent, metrics)
    _reward_model_scores(ctx, out, samples, with_parent, metrics)
    _pairwise_judges(ctx, judges, with_parent, metrics)
    write_jsonl_atomic(ctx.dir / SAMPLES_FILE, out)
    if spec.lm_eval is not None and spec.lm_eval.tasks:
        metrics.update(run_lm_eval(ctx, policy, tokenizer, spec.lm_eval))
    return metrics


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
    parent_by_prompt = {}
    for r in parent:
        parent_by_prompt.setdefault(r["prompt"], []).append(r)
    k_of: dict[str, int] = {}
    for row in out:  # this row's k-th partner in the parent's samples
        k = k_of[row["prompt"]] = k_of.get(row["prompt"], -1) + 1
        theirs = parent_by_prompt.get(row["prompt"], [])
        if k < len(theirs):
            row["parent_response"], row["parent_ended"] = theirs[k]["response"], bool(theirs[k].get("ended", True))
    return [r for r in out if "parent_response" in r]


def _verify(ctx, judges: dict, out: list[dict], samples: Samples, eval_rows: list[dict], with_parent: list[dict],
            metrics: dict) -> None:
    """The verifier judges: pass rates of this stage's samples, and win rates against the parent's."""
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
        if with_parent:
            idx = [i for i, r in enumerate(out) if "parent_response" in r]
            theirs = run_verifier(fn, [out[i]["prompt"] for i in idx], [out[i]["parent_response"] for i in idx],
                                  [eval_rows[i] for i in idx], [out[i]["parent_ended"] for i in idx])
            for i, v in zip(idx, theirs):
                out[i][f"parent_{name}"] = v
            _win(metrics, f"{name}_win_rate_vs_parent", with_parent, name, f"parent_{name}", ctx.seed)


def _reward_model_scores(ctx, out: list[dict], samples: Samples, with_parent: list[dict], metrics: dict) -> None:
    """The recipe's reward model: mean score; win rates against the parent and against sft."""
    rm_stage = reward_stage_of(ctx.recipe, ctx.name)
    if rm_stage is None:
        return
    artifact = load_reward_model(ctx.stage_dir(rm_stage), ctx.recipe.model)
    for row, s in zip(out, score(artifact, samples.prompts, samples.responses)):
        row["reward"] = s
    metrics["mean_reward"] = sum(r["reward"] for r in out) / len(out)
    metrics["reward_stage"] = rm_stage
    if with_parent:
        for row, s in zip(with_parent, score(artifact, [r["prompt"] for r in with_parent],
                                             [r["parent_response"] for r in with_parent])):
            row["parent_reward"] = s
        _win(metrics, "rm_win_rate_vs_parent", with_parent, "reward", "parent_reward", ctx.seed)
    sft = sft_stage_of(ctx.recipe, ctx.name)
    if sft is not None and sft == ctx.config.from_ and "rm_win_rate_vs_parent" in metrics:
        metrics["rm_win_rate_vs_sft"] = metrics["rm_win_rate_vs_parent"]
        metrics["rm_win_rate_vs_sft_ci"] = metrics["rm_win_rate_vs_parent_ci"]
    elif sft is not None and covers(base := read_samples(ctx.stage_dir(sft)), samples,
                                    ctx.config.eval.samples_per_prompt):
        scored = [{**r, "reward": s} for r, s in zip(base, score(artifact, [r["prompt"] for r in base],
                                                                 [r["response"] for r in base]))]
        win = win_rate(paired(out, scored), "reward", seed=ctx.seed)
        if win["rate"] is not None:
            metrics["rm_win_rate_vs_sft"], metrics["rm_win_rate_vs_sft_ci"] = win["rate"], [win["lo"], win["hi"]]
    del artifact


def _pairwise_judges(ctx, judges: dict, with_parent: list[dict], metrics: dict) -> None:
    """Pairwise judge models: this stage's response against the parent's, both orders."""
    for name, j in judges.items():
        if not j.pairwise:
            continue
        if not with_parent:
            metrics[f"{name}_status"] = "skipped: no parent samples of the same prompts"
            continue
        verdicts = pairwise(judge_model(j, ctx.recipe.model), judging_prompt(j, ctx.recipe.path),
                            [r["prompt"] for r in with_parent], [r["response"] for r in with_parent],
                            [r["parent_response"] for r in with_parent])
        for row, v in zip(with_parent, verdicts):
            row[f"{name}_vs_parent"], row[f"{name}_answers"] = v.score(), [v.first, v.second]
        metrics.update(pairwise_metrics(name, [r["prompt"] for r in with_parent], verdicts, ctx.seed))


def _win(metrics: dict, name: str, rows: list[dict], mine: str, theirs: str, seed: int) -> None:
    """`name` and `name_ci` from rows holding both columns (k-th sample against the parent's k-th)."""
    per_prompt: dict[str, list[float]] = {}
    for r in rows:
        per_prompt.setdefault(r["prompt"], []).append(outcome(float(r[mine]), float(r[theirs])))
    win = bootstrap_rate(per_prompt, seed)
    if win["rate"] is not None:
        metrics[name], metrics[f"{name}_ci"] = win["rate"], [win["lo"], win["hi"]]


