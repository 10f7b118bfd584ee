"""Rollouts: sample responses from the policy with the KV cache and lay them out for PPO.

A rollout batch is one tensor `input_ids` [B, P + T]: the prompts left-padded to width P, then the
responses right-padded to width T. A response ends at its first end-of-turn token (kept, it is an
action too); `response_mask` [B, T] is 1 up to and including it. A response that never emitted
end-of-turn within `max_new_tokens` is marked `ended = False` (it is penalised, see rewards.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rollout:
    prompts: list[list[dict]]  # conversations, each ending with the user's turn
    responses: list[str]  # decoded response text, end-of-turn stripped
    input_ids: Tensor  # [B, P + T]
    attention_mask: Tensor  # [B, P + T]
    prompt_len: int  # P
    response_ids: Tensor  # [B, T]
    response_mask: Tensor  # [B, T] float, 1 on real response tokens
    ended: Tensor  # [B] bool

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor, int, Tensor, int]:
        """The rows `idx`, without the columns that are padding in all of them (prompt padding on the
        left, response padding on the right): (input_ids, attention_mask, prompt_len, response_ids, width).
        Their response positions are the first `width` of the full batch's; the rest are padding."""
        am = self.attention_mask[idx]
        first = int(am[:, : self.prompt_len].any(0).long().argmax())  # first column with a real prompt token
        width = int(self.response_mask[idx].sum(1).max())
        end = self.prompt_len + width
        return (self.input_ids[idx, first:end], am[:, first:end], self.prompt_len - first,
                self.response_ids[idx, :width], width)


def response_mask_from(response_ids: Tensor, eot_id: int) -> tuple[Tensor, Tensor]:
    """(mask [B, T] float: 1 up to and including the first `eot_id`, everywhere if there is none;
    ended [B] bool: the row contains `eot_id`). Tokens after the first end-of-turn are padding."""
    is_eot = response_ids == eot_id
    # number of end-of-turn tokens strictly before each position: 0 means "still inside the response"
    before = torch.cumsum(is_eot.long(), dim=1) - is_eot.long()
    return (before == 0).float(), is_eot.any(dim=1)


@torch.no_grad()
def generate(lm, tokenizer, conversations: list[list[dict]], max_new_tokens: int, temperature: float = 1.0,
             eot_id: int | None = None) -> Rollout:
    """One sampled response per prompt conversation (pure sampling: top_k 0, top_p 1, so the tokens
    follow exactly the distribution PPO trains). Uses torch's global RNG: seed it before calling."""
    eot_id = tokenizer.eos_token_id if eot_id is None else eot_id
    dev = next(lm.parameters()).device
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_ids, prompt_mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    was_training = lm.training
    lm.eval()
    out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=temperature,
                      top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, use_cache=True,
                      eos_token_id=eot_id, pad_token_id=tokenizer.pad_token_id)
    lm.train(was_training)
    prompt_len = prompt_ids.shape[1]
    response_ids = out[:, prompt_len:]
    mask, ended = response_mask_from(response_ids, eot_id)
    # generate pads finished rows with pad_token_id; make the padding explicit whatever it wrote
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    responses = tokenizer.batch_decode([r[m.bool()] for r, m in zip(response_ids, mask)], skip_special_tokens=True)
    return Rollout(
        prompts=list(conversations),
        responses=responses,
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        prompt_len=prompt_len,
        response_ids=response_ids,
        response_mask=mask,
        ended=ended,
    )
