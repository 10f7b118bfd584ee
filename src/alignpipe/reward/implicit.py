"""The implicit reward of a DPO-family stage as a scorer (`reward_model: <a dpo stage>`).

DPO trains a policy pi whose reward is implicit: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al.
2023; RewardBench scores DPO models this way). Here log pi(y|x) is summed over the response's tokens as the chat
template renders them (the end-of-turn token included), pi is the stage's checkpoint, pi_ref the stage it started
`from` (its DPO reference), and beta the stage's own (`metrics.beta`, else 0.1 as DPOTrainer's default).

Normalisation: none. The score is already on the scale DPO's loss gave it (mean 0, std 1 are recorded, so PPO's
(raw - mean) / std leaves it as it is); `NORMALISATION` says so in every consumer's record.

`reference_free()` gives the same scorer without its reference: beta * log pi(y|x), the DPO policy's own summed
likelihood of the response (a ppo stage's `implicit_reward: likelihood`; cf. SimPO's reference-free reward, which
divides by the length). Its ranking is the DPO policy's: on the default world its greedy answer is the right one
where the SFT model's is wrong (docs/ppo.md), but it also prefers shorter responses.
"""

from __future__ import annotations

# Heavy imports (torch, transformers) stay inside the functions that use them: the CLI starts without them.
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpipe.errors import RunError
from alignpipe.models import loading as modeling
from alignpipe.recipe.schema import ModelSpec
from alignpipe.reward.artifact import conversation, encode
from alignpipe.runfolder.manifests import read_manifest
from alignpipe.runtime.progress import track

if TYPE_CHECKING:
    import torch

NORMALISATION = "none: beta * (log pi(y|x) - log pi_ref(y|x)) summed over the response tokens; mean 0, std 1"
NORMALISATION_FREE = "none: beta * log pi(y|x) summed over the response tokens (no reference); mean 0, std 1"
DEFAULT_BETA = 0.1


def prompt_lengths(tokenizer, prompts: list) -> list[int]:
    """Tokens of each prompt as rendered before its response (the assistant turn opened)."""
    convs = [conversation(p, []) for p in prompts]
    out = tokenizer.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    return [len(ids) for ids in out["input_ids"]]


def response_logprob(model, ids: "torch.Tensor", mask: "torch.Tensor", starts: list[int]) -> "torch.Tensor":
    """Sum of log p(token) over each right-padded row's tokens from `starts[i]` on, shape [batch]."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    token_lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = mask[:, 1:].clone()
    for i, start in enumerate(starts):
        keep[i, : max(0, start - 1)] = 0  # predictions of prompt tokens
    return (token_lp * keep).sum(-1)


@dataclass
class ImplicitReward:
    model: Any  # the DPO-family policy (AutoModelForCausalLM), eval mode
    reference: Any  # the policy it started from; None: reference-free, beta * log pi(y|x)
    tokenizer: Any
    beta: float
    mean: float = 0.0
    std: float = 1.0
    normalisation: str = NORMALISATION
    kind: str = "implicit"

    def normalise(self, scores: list[float]) -> list[float]:
        return [(s - self.mean) / self.std for s in scores]

    def reference_free(self) -> "ImplicitReward":
        """The same policy and beta scoring beta * log pi(y|x), with no reference."""
        return ImplicitReward(self.model, None, self.tokenizer, self.beta, normalisation=NORMALISATION_FREE)

    def score(self, prompts: list, responses: list, batch_size: int = 64) -> list[float]:
        import torch

        rows = encode(self.tokenizer, prompts, responses)
        starts = prompt_lengths(self.tokenizer, prompts)
        dev = next(self.model.parameters()).device
        if self.reference is not None:
            self.reference.to(dev)
        pad = self.tokenizer.pad_token_id
        out: list[float] = []
        for at in track(range(0, len(rows), batch_size), "scoring", unit="batch"):
            chunk = rows[at:at + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            diff = response_logprob(self.model, ids, mask, starts[at:at + batch_size])
            if self.reference is not None:
                diff = diff - response_logprob(self.reference, ids, mask, starts[at:at + batch_size])
            out.extend((self.beta * diff).tolist())
        return out


def load_implicit_reward(stage_dir: Path, spec: ModelSpec | None = None) -> ImplicitReward:
    """A complete DPO-family stage's implicit reward: its checkpoint, its `from` stage as the reference, its beta."""
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir) or {}
    spec = spec or ModelSpec()
    parent = (manifest.get("resolved_config") or {}).get("from")
    policy = modeling.load_stage_model(stage_dir, spec).eval()
    if parent:
        reference = modeling.load_stage_model(stage_dir.parent / parent, spec).eval()
    elif spec.path:
        reference = modeling.load_pretrained(spec.path, spec).eval()
    else:
        raise RunError("no reference policy for the implicit reward: the stage has no `from` and the recipe no "
                       "model.path", where=str(stage_dir), fix="name a DPO stage that starts `from:` another stage")
    policy.to(modeling.device())
    beta = (manifest.get("metrics") or {}).get("beta")
    tokenizer = modeling.load_tokenizer(modeling.checkpoint_dir(stage_dir), spec)
    return ImplicitReward(policy, reference, tokenizer, float(beta if beta is not None else DEFAULT_BETA))
