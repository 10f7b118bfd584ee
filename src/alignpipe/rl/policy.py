"""The policy, its value head and the reference policy, arranged to hold as few weights as possible.

`PolicyWithValue` runs the causal LM's trunk once and puts two heads on its last hidden state: the
LM head (logits of the response tokens) and a scalar value head. With LoRA the trunk carries the
adapter, and the reference policy is the *same* module with the adapter switched off
(`AdapterOff`), so one copy of the base weights serves policy, reference and value. With full
fine-tuning the reference is a frozen copy of the starting model.
"""

from __future__ import annotations

# Heavy imports (peft) stay inside the functions that use them: the CLI starts without them.
import copy

import torch
from torch import Tensor, nn


class PolicyWithValue(nn.Module):
    """A causal LM plus a linear value head on its final (normed) hidden state.

    The value head shares the trunk (Ziegler et al. 2019): no second network, and the value loss
    shapes the trunk's features, weighted by `vf_coef` in the PPO loss."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        # float32 whatever the LM's dtype: a bf16 head would round away small value updates
        self.value_head = nn.Linear(lm.get_output_embeddings().in_features, 1, dtype=torch.float32)
        # Start at V = 0 everywhere: random values would add noise to the first advantages.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """(logits [B, T, V] scaled by 1/temperature, values [B, T]) for the T response positions of
        `input_ids` = [left-padded prompt of width prompt_len | right-padded response]. Position t
        holds the distribution that produced response token t and the value of the state before it."""
        hidden = run_trunk(self.lm, input_ids, attention_mask)[:, prompt_len - 1: -1]
        logits = self.lm.get_output_embeddings()(hidden).float() / temperature
        values = self.value_head(hidden.float()).squeeze(-1)
        return logits, values


class AdapterOff(nn.Module):
    """The reference policy of a LoRA run: the peft model with its adapter disabled. It holds no
    weights of its own (its parameters are the policy's), and it is called like a causal LM."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def run_trunk(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden state [B, L, H] of the LM's decoder, with position ids counted from each row's
    first real token, as `generate` counts them for a left-padded batch."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def response_logits(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                    temperature: float = 1.0) -> Tensor:
    """Logits [B, T, V] of the response positions under `lm` (a causal LM or an `AdapterOff`)."""
    if isinstance(lm, AdapterOff):
        with lm.peft_model.disable_adapter():
            return response_logits(lm.peft_model, input_ids, attention_mask, prompt_len, temperature)
    hidden = run_trunk(lm, input_ids, attention_mask)[:, prompt_len - 1: -1]
    return lm.get_output_embeddings()(hidden).float() / temperature


def build(lm: nn.Module, lora_config=None) -> tuple[PolicyWithValue, nn.Module]:
    """(policy with value head, reference). With a peft `lora_config` the LM gets an adapter and the
    reference is the adapter switched off; without, the reference is a frozen copy of `lm`."""
    if lora_config is not None:
        from peft import get_peft_model

        peft_model = get_peft_model(lm, lora_config)
        return PolicyWithValue(peft_model), AdapterOff(peft_model)
    reference = copy.deepcopy(lm).eval()
    reference.requires_grad_(False)
    return PolicyWithValue(lm), reference


def distinct_weights(*modules: nn.Module) -> int:
    """Number of parameter elements held in memory by all `modules` together, shared tensors once."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())
