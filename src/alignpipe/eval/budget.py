"""What bounds a stage's evaluation: prompts fit the model's context, batches fit a memory budget.

A prompt longer than the model's context less `eval.max_new_tokens` is cut from the left, as the reward
stage cuts pairs (whole early turns first, then the start of the earliest turn left, so the last user turn's
end stays); one that cannot fit even so (the chat template's own tokens are too many) is skipped. Both are
counted and said in one line.

Batches are sized by tokens, not by count: consecutive prompts join a batch while its estimated peak memory
(KV cache, attention scores, activations, logits: `batch_bytes`) stays within `eval.batch_memory_mb`
(default: 1024 MB on CPU, 40% of the free GPU memory on a GPU) and it holds at most `eval.batch_size`
sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from alignpipe.errors import EvalError

CPU_BUDGET_MB = 1024
GPU_SHARE = 0.4
FLOAT_BYTES = 4  # scores and logits are float32 whatever the weights are


def context_of(model) -> int | None:
    """Positions the model attends over (its config's max_position_embeddings / n_positions), None if unsaid."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_budget(model, max_new_tokens: int, key: str = "eval.max_new_tokens") -> int | None:
    """Tokens a rendered prompt may have: the context less the response's room. EvalError when none is left."""
    context = context_of(model)
    if context is None:
        return None
    if max_new_tokens >= context:
        raise EvalError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                        f"{context} positions", key=key, fix=f"set it below {context}, e.g. {max(1, context // 4)}")
    return context - max_new_tokens


def cut_from_left(messages: list[dict], length: Callable[[list[dict]], int], budget: int) -> list[dict] | None:
    """`messages` as they are when `length(messages) <= budget`; else without their earliest turns, then
    without the start of the earliest turn left, until they fit. None when an empty last turn does not fit."""
    if length(messages) <= budget:
        return messages
    last = messages[-1]
    if length([{**last, "content": ""}]) > budget:
        return None
    while len(messages) > 1 and length(messages) > budget:
        messages = messages[1:]
    if length(messages) <= budget:
        return messages
    text, lo, hi = messages[0]["content"], 0, len(messages[0]["content"])
    while lo < hi:  # the smallest start offset that fits
        mid = (lo + hi) // 2
        if length([{**messages[0], "content": text[mid:]}] + messages[1:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return [{**messages[0], "content": text[lo:]}] + messages[1:]


def rendered_length(tokenizer) -> Callable[[list[dict]], int]:
    """Tokens of messages rendered by the chat template with the assistant's turn opened (as sampled)."""
    def length(messages: list[dict]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return length


@dataclass
class Fitted:
    prompts: list[list[dict] | None]  # per prompt: its messages as sampled, None when skipped
    cut: int = 0
    skipped: int = 0
    budget: int | None = None

    def line(self, stage: str) -> str | None:
        if not self.cut and not self.skipped:
            return None
        parts = [f"{self.cut} cut from the left" if self.cut else "", f"{self.skipped} skipped (its chat template "
                 "alone is longer)" if self.skipped else ""]
        who = f"stage {stage}" if stage else "evaluation"
        return (f"[alignpipe] {who}: of {len(self.prompts)} eval prompts, "
                f"{' and '.join(p for p in parts if p)} to fit {self.budget} tokens (the model's context less "
                f"eval.max_new_tokens)")


def fit_prompts(tokenizer, prompts: list[list[dict]], budget: int | None) -> Fitted:
    """Each prompt cut from the left to `budget` tokens, or skipped (see the module docstring)."""
    if budget is None:
        return Fitted(list(prompts))
    length = rendered_length(tokenizer)
    out = Fitted([], budget=budget)
    for messages in prompts:
        fitted = cut_from_left(messages, length, budget)
        out.prompts.append(fitted)
        out.cut += fitted is not None and fitted != messages
        out.skipped += fitted is None
    return out


# --- memory ----------------------------------------------------------------------------------------


def budget_bytes(model, batch_memory_mb: float | None) -> int:
    """The memory one batch may take: `eval.batch_memory_mb`, else a share of the free GPU memory, else 1 GB."""
    if batch_memory_mb:
        return int(batch_memory_mb * 2**20)
    import torch

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * GPU_SHARE)
    return CPU_BUDGET_MB * 2**20


def _sizes(cfg) -> dict[str, int]:
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 1024)
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0) or 16)
    return {"layers": int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 24),
            "hidden": hidden, "heads": heads,
            "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or hidden // heads),
            "inner": int(getattr(cfg, "intermediate_size", None) or 4 * hidden),
            "vocab": int(getattr(cfg, "vocab_size", 0) or 32000)}


def batch_bytes(cfg, seqs: int, width: int, every_logit: bool = False, weight_bytes: int = FLOAT_BYTES) -> int:
    """Estimated peak memory of one forward pass (or generation) over `seqs` sequences of `width` tokens:
    the KV cache of every layer, one layer's attention scores (eager: heads x width x width, twice for the
    softmax) and activations, and the logits: of the last position when generating, of every position
    (with their log-softmax) when `every_logit`."""
    s = _sizes(cfg)
    tokens = seqs * width
    kv = tokens * s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * weight_bytes
    scores = 2 * seqs * s["heads"] * width * width * FLOAT_BYTES
    activations = 3 * tokens * max(s["inner"], s["hidden"]) * FLOAT_BYTES
    logits = (3 * tokens if every_logit else 2 * seqs) * s["vocab"] * FLOAT_BYTES
    return kv + scores + activations + logits


def plan_batches(widths: list[int], cost: Callable[[int, int], int], budget: int, max_items: int,
                 per_item: int = 1) -> list[tuple[int, int]]:
    """(start, end) of consecutive items batched while `cost(sequences, widest)` stays within `budget` and a
    batch holds at most `max_items` sequences (`per_item` sequences per item); one item always makes a batch."""
    out, start, widest = [], 0, 0
    for i, w in enumerate(widths):
        count = (i - start + 1) * per_item
        wider = max(widest, w)
        if i > start and (count > max(max_items, per_item) or cost(count, wider) > budget):
            out.append((start, i))
            start, wider = i, w
        widest = wider
    if start < len(widths):
        out.append((start, len(widths)))
    return out
