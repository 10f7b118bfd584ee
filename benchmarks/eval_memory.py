"""The evaluation of one policy stage on a tiny model with prompts longer than its context (issue #34):
peak memory and wall time of sampling `--samples` responses to each of `--prompts` long prompts and the
KL to a reference on them, as `evaluation._evaluate` does, with the recipe's default eval settings.

Run it under /usr/bin/time -v for the peak resident memory, with PYTHONPATH pointing at the code to measure
(1 thread, as the tests; the before code: an unmodified checkout, e.g. /work/main):

    PYTHONPATH=/work/main/src /usr/bin/time -v python benchmarks/eval_memory.py        # before
    PYTHONPATH=src /usr/bin/time -v python benchmarks/eval_memory.py                   # after

It prints one JSON line: the seconds the evaluation took, the prompts' token lengths, and what was sampled.
The model is `alignpipe.models.tiny`'s Qwen2 look-alike (~40k parameters, 256 positions), built in a
temporary folder; the prompts are seeded pseudo-English of ~2,200 characters (1,678-1,864 tokens).

Measured 2026-12-07 on the shared 2-core AMD EPYC development machine (1 thread, other work running),
evaluation seconds and peak resident memory (`/usr/bin/time -v`, the whole process):

| attention | before: prompts not cut, 128 sequences a batch | after: cut to 224 tokens, batches by memory |
|---|---|---|
| transformers' default (sdpa) | 101.1 s, 2.93 GB (again, under heavier load: 234.1 s, 2.94 GB) | 4.1-5.9 s, 0.51-0.57 GB |
| `--attn eager` | 461.6 s, 9.52 GB | 8.1 s, 0.61 GB |
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in is it that for on with as was at by this from or an be are which have not one "
         "question answer model river mountain garden letter summer number window morning paper kitchen "
         "station history library yellow quickly carefully because however although").split()


def long_prompts(n: int, chars: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words)[:chars] + "?")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--chars", type=int, default=2200)
    ap.add_argument("--attn", default=None, help="attention implementation (eager, sdpa); default: transformers'")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignpipe.eval.policy import kl_to_reference, sample
    from alignpipe.recipe.schema import EvalSpec
    from alignpipe.models.tiny import save_tiny_model

    torch.set_num_threads(1)
    spec = EvalSpec()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_model(Path(tmp) / "tiny-qwen2")
        tok = AutoTokenizer.from_pretrained(folder)
        kw = {"attn_implementation": args.attn} if args.attn else {}
        policy = AutoModelForCausalLM.from_pretrained(folder, **kw)
        reference = AutoModelForCausalLM.from_pretrained(folder, **kw)
    prompts = long_prompts(args.prompts, args.chars)
    rendered = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts]
    lengths = [len(ids) for ids in tok(rendered, add_special_tokens=False)["input_ids"]]
    t0 = time.perf_counter()
    samples = sample(policy, tok, prompts, args.samples, spec.max_new_tokens, spec.temperature, spec.top_p, 0,
                     spec.batch_size)
    sampled_s = time.perf_counter() - t0
    kl = kl_to_reference(policy, reference, samples, tok.pad_token_id)
    total_s = time.perf_counter() - t0
    print(json.dumps({"eval_s": round(total_s, 1), "sampling_s": round(sampled_s, 1), "kl": round(kl, 4),
                      "prompts": args.prompts, "samples": len(samples.responses),
                      "context": policy.config.max_position_embeddings, "max_new_tokens": spec.max_new_tokens,
                      "prompt_tokens_max": max(lengths), "prompt_tokens_min": min(lengths),
                      "longest_prompt_sampled": max(len(p) for p in samples.prompt_ids),
                      "attention": policy.config._attn_implementation}))


if __name__ == "__main__":
    main()
