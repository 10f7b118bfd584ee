"""The evaluation every policy stage shares: sample responses to held-out prompts, judge them.

Sampling (temperature 1.0 by default), not greedy, so the figure describes the policy's distribution;
a fixed seed and a fixed number of samples per prompt make it reproducible and comparable across
stages. The judge is the embedded world's ground truth; no trained model ever sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from alignpipe.recipe import EvalSpec


@dataclass
class Samples:
    prompts: list[str]  # user message per sample (repeated samples_per_prompt times)
    responses: list[str]
    ended: list[bool]  # the response emitted end-of-turn within max_new_tokens
    lengths: list[int]  # response tokens
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]


def render_prompts(tokenizer, user_messages: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                          add_generation_prompt=True) for m in user_messages]


@torch.no_grad()
def sample(model, tokenizer, user_messages: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
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
    from alignpipe.progress import track

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
            out.prompts.append(user_messages[start + i // n])
            out.responses.append(tokenizer.decode(ids, skip_special_tokens=True))
            out.ended.append(ended)
            out.lengths.append(len(ids))
            out.prompt_ids.append([t for t, m in zip(prompt_rows[i], mask_rows[i]) if m])
            out.response_ids.append(ids)
    model.train(was_training)
    return out


def judge_samples(samples: Samples) -> list[bool]:
    from alignpipe.data.world import judge

    # a response cut off before end-of-turn is not a finished answer
    return [ended and judge(p, r) for p, r, ended in zip(samples.prompts, samples.responses, samples.ended)]


def evaluate_policy(model, tokenizer, world, spec: EvalSpec, seed: int, out_dir: Path,
                    extra: dict[str, list] | None = None) -> tuple[dict, Samples]:
    """Judge pass rate of sampled responses to the world's held-out prompts; samples to a JSONL file.

    `extra` adds per-sample columns to the samples file (e.g. reward-model scores).
    """
    prompts = [p["prompt"] for p in world.eval_prompts()[: spec.num_prompts]]
    samples = sample(model, tokenizer, prompts, spec.samples_per_prompt, spec.max_new_tokens, spec.temperature,
                     spec.top_p, seed, spec.batch_size)
    passed = judge_samples(samples)
    write_samples(Path(out_dir) / "eval_samples.jsonl", samples, passed, extra)
    metrics = {
        "judge_pass_rate": sum(passed) / len(passed),
        "judge_passed": sum(passed),
        "judge_total": len(passed),
        "eot_rate": sum(samples.ended) / len(samples.ended),
        "mean_response_tokens": sum(samples.lengths) / len(samples.lengths),
    }
    return metrics, samples


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
    from alignpipe.runs import is_complete

    own = getattr(recipe.stages[stage], "reward_model", None)
    if own:
        return own
    for name, cfg in recipe.stages.items():
        if cfg.kind == "reward" and is_complete(recipe.stage_dir(name)):
            return name
    return None


def evaluate_aligned(ctx, policy, reference, tokenizer) -> dict:
    """The shared evaluation of an aligned policy (dpo, ppo, grpo, ...): the judge's pass rate on sampled
    held-out responses, the mean score of the recipe's reward model on those same samples, and the
    KL divergence to the reference policy (nats per response, estimated on the policy's samples)."""
    metrics, samples = evaluate_policy(policy, tokenizer, ctx.world, ctx.config.eval, ctx.seed, ctx.dir)
    metrics["kl_to_reference"] = kl_to_reference(policy, reference, samples, tokenizer.pad_token_id)
    rm_stage = reward_stage_of(ctx.recipe, ctx.name)
    if rm_stage is not None:
        from alignpipe.reward.artifact import load_reward_model, score

        artifact = load_reward_model(ctx.stage_dir(rm_stage), ctx.recipe.model)
        scores = score(artifact, samples.prompts, samples.responses)
        metrics["mean_reward"] = sum(scores) / len(scores)
        metrics["reward_stage"] = rm_stage
        passed = judge_samples(samples)
        write_samples(ctx.dir / "eval_samples.jsonl", samples, passed, {"reward": scores})
    return metrics
