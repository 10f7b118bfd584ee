"""The pure pieces of PPO for RLHF: masked statistics, KL estimators, per-token rewards, GAE, the
clipped losses and the KL-coefficient controllers.

Follows Schulman et al. 2017 (PPO, GAE) and the RLHF recipe of Ziegler et al. 2019 / Ouyang et al.
2022: a reward-model score at the end of the response, a per-token KL penalty to a frozen reference
policy, a value head trained on GAE returns.

Shape conventions: per-token tensors are [batch, response_len] (B, T). `mask` (float or bool, same
shape) is 1 on real response tokens and 0 on the padding after the end of the turn. Everything here
is torch only, stateless except the two controllers, and knows nothing about models.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_estimate",
    "token_rewards",
    "gae",
    "policy_loss",
    "value_loss",
    "AdaptiveKLController",
    "FixedKLController",
]

KL_KINDS = ("k1", "k2", "k3")


# --- masked statistics ---------------------------------------------------------------------------


def _masked(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(x with padded entries set to 0, mask as x's dtype). Zeroing with `where` rather than `x * mask`
    keeps a nan/inf sitting in the padding from leaking into sums (nan * 0 is nan)."""
    m = mask.to(x.dtype)
    return torch.where(m != 0, x, torch.zeros_like(x)), m


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask), over all entries (dim=None, a 0-dim tensor) or along `dim`.

    A slice with no real entries has mean 0 (not nan), so an empty row cannot poison a batch stat.
    """
    x, m = _masked(x, mask)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1e-8)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the masked entries (a 0-dim tensor): mean((x - mean)^2), times n / (n - 1)
    when `unbiased` (Bessel), n = sum(mask). Raises ValueError when there are too few entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.to(x.dtype).sum()
    if unbiased:
        if n.item() < 2:
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 masked entries, got {n.item():g}")
        var = var * n / (n - 1)
    elif n.item() == 0:
        raise ValueError("masked_var: the mask has no real entries")
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8), mean and (unbiased) var taken over the masked entries of the
    whole tensor. With shift_mean=False the mean is added back (only the scale changes; used for
    rewards, where the sign of the mean matters). Padded entries come out as 0."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return _masked(out, mask)[0]


# --- distributions over the vocabulary -----------------------------------------------------------


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log pi(tokens[b, t]) = logits[b, t, tok] - logsumexp_v logits[b, t, v]; [B, T, V], [B, T] -> [B, T].

    `logits[:, t]` must be the distribution that produced `tokens[:, t]` (the caller shifts by one).
    Computed in float32 at least (log-probs in bf16 are too coarse for PPO ratios); gather minus
    logsumexp skips the extra [B, T, V] tensor a full log_softmax would allocate.
    """
    logits = _at_least_float32(logits)
    picked = torch.gather(logits, -1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v per position, in nats; [B, T, V] -> [B, T]. A -inf logit (a banned
    token) contributes 0, not nan. Computed in float32 at least."""
    logits = _at_least_float32(logits)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


# --- KL and rewards ------------------------------------------------------------------------------


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi (J. Schulman, "Approximating KL
    divergence", 2020). With d = logp - ref_logp and r = ref/pi = exp(-d):
      k1 = d                  unbiased, high variance, can be negative per token;
      k2 = 0.5 * d^2          biased (low for small KL), >= 0;
      k3 = (r - 1) - log r    unbiased, >= 0, lower variance than k1.
    Same shape as the inputs."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        # (r - 1) - log r with log r = -d; expm1 keeps precision when d is tiny.
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def _last_real_index(mask: Tensor) -> Tensor:
    """[B] index of the last position with mask != 0 in each row; raises if a row has none."""
    real = mask != 0
    if not bool(real.any(dim=1).all()):
        raise ValueError("every row needs at least one real response token (mask all 0 in some row)")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(real)
    return torch.where(real, positions, -1).amax(dim=1)


def token_rewards(
    score: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    kl_kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward: r_t = -kl_coef * kl_t on every real token, plus the sequence score [B]
    at the last real token of each row (Ziegler et al. 2019). Padding gets 0.

    Returns (rewards [B, T], kl [B, T]); `kl` is the unscaled estimate (0 on padding), for logging
    and for the adaptive controller. Inputs are treated as data (detached)."""
    logp, ref_logp, score = logp.detach(), ref_logp.detach(), score.detach()
    kl, _ = _masked(kl_estimate(logp, ref_logp, kl_kind), mask)
    rewards = -kl_coef * kl
    last = _last_real_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards, kl


# --- advantages ----------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over each row:
        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},
    with V and A after the last real token taken as 0 (the episode ends with the turn).
    Returns (advantages, returns = advantages + values), [B, T] each, 0 where mask == 0, detached:
    they are targets, never differentiated through."""
    rewards, _ = _masked(rewards.detach(), mask)
    values, m = _masked(values.detach(), mask)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # The mask resets the recursion on padding, so the last real token sees V = A = 0 after it.
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv
    returns = (advantages + values) * m
    return advantages, returns


# --- losses --------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (PPO): with ratio = exp(logp - old_logp),
        loss = masked_mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ).
    Returns (0-dim loss, stats); stats are detached 0-dim tensors:
      clipfrac   fraction of real tokens where the clipped term is the larger (their gradient is 0);
      approx_kl  k3 estimate of KL(old || new) on the rollout tokens: mean((r - 1) - log r), r = new/old;
      ratio_mean masked mean of the ratio."""
    advantages = advantages.detach()
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            # Samples come from old, so estimating KL(old || new) puts old in the "pi" slot.
            "approx_kl": masked_mean(kl_estimate(old_logp, logp, "k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: with v_clip = old + clip(v - old, -eps, eps),
        loss = 0.5 * masked_mean( max((v - R)^2, (v_clip - R)^2) ).
    Returns (0-dim loss, stats); vf_clipfrac is the fraction of real tokens where the clipped error is
    the larger (detached 0-dim tensor)."""
    returns, old_values = returns.detach(), old_values.detach()
    v_clip = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err = (values - returns) ** 2
    err_clip = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clip > err).to(values.dtype), mask)}
    return loss, stats


# --- KL coefficient controllers ------------------------------------------------------------------


class AdaptiveKLController:
    """Proportional controller on the KL coefficient (Ziegler et al. 2019, sec. 2.2): after a batch
    whose measured KL is `current_kl`,
        error = clip(current_kl / target - 1, -0.2, 0.2);   value *= 1 + error * n_steps / horizon.
    KL above target raises the penalty, below lowers it. `n_steps` is how many samples (episodes)
    the batch held, so `horizon` is in samples."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_kl_coef >= 0, target > 0, horizon > 0; got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        # target/horizon come from the config; only the coefficient is training state.
        self.value = float(d["value"])


class FixedKLController:
    """Same interface as AdaptiveKLController; the coefficient never changes."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"need kl_coef >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
