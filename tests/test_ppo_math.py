"""PPO maths against values worked out by hand (the arithmetic is in the comments), plus a few
properties checked against tiny independent loops. No function under test computes an expected value."""

import math

import pytest
import torch

from alignpipe.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

torch.set_num_threads(1)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=atol, rtol=0)


# --- masked statistics ---------------------------------------------------------------------------

X = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
MASK = [[1, 1, 1], [1, 0, 0]]


def test_masked_mean_and_var():
    x, m = t(X), torch.tensor(MASK)
    close(masked_mean(x, m), 2.5)  # (1+2+3+4)/4
    close(masked_mean(x, m, dim=1), [2.0, 4.0])
    # deviations from 2.5: -1.5 -0.5 0.5 1.5 -> squares sum to 5.0
    close(masked_var(x, m, unbiased=False), 5.0 / 4)
    close(masked_var(x, m), 5.0 / 3)
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))  # one entry: no unbiased variance


def test_masked_mean_empty_row_is_zero_not_nan():
    close(masked_mean(t(X), torch.tensor([[1, 1, 0], [0, 0, 0]]), dim=1), [1.5, 0.0])


@pytest.mark.parametrize("pad", [0.0, 1e6, float("nan"), float("inf")])
def test_masked_whiten_ignores_padding(pad):
    x, m = t([[1.0, 2.0, 3.0], [4.0, pad, pad]]), torch.tensor(MASK)
    # mean 2.5, unbiased var 5/3, std 1.2909944; 1.5/std = 1.1618950, 0.5/std = 0.3872983
    w = masked_whiten(x, m)
    close(w, [[-1.1618950, -0.3872983, 0.3872983], [1.1618950, 0.0, 0.0]])
    close(masked_whiten(x, m, shift_mean=False), [[1.3381050, 2.1127017, 2.8872983], [3.6618950, 0.0, 0.0]])


def test_masked_whiten_gives_mean_0_std_1_on_real_entries():
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    lengths = [7, 5, 2, 4]
    m = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    w = masked_whiten(x, m)
    real = w[m.bool()]
    close(real.mean(), 0.0, atol=1e-9)
    close(real.std(), 1.0, atol=1e-6)
    assert (w[~m.bool()] == 0).all()
    # Changing only the padding leaves the result unchanged.
    x2 = torch.where(m.bool(), x, torch.full_like(x, -123.0))
    torch.testing.assert_close(masked_whiten(x2, m), w)


# --- vocabulary distributions --------------------------------------------------------------------


def test_logprobs_and_entropy_on_hand_built_distributions():
    # Position 0: p = [1/2, 1/4, 1/4, 0] (logits log p + 3; the -inf is a banned token).
    # Position 1: uniform over 4 (any equal logits).
    logits = torch.tensor(
        [[[math.log(0.5) + 3, math.log(0.25) + 3, math.log(0.25) + 3, float("-inf")], [7.0, 7.0, 7.0, 7.0]]]
    )
    tokens = torch.tensor([[0, 2]])
    close(logprobs_from_logits(logits, tokens), [[-0.6931472, -1.3862944]])  # log 1/2, log 1/4
    # H0 = 1/2 ln 2 + 2 * 1/4 ln 4 = 0.3465736 + 0.6931472;  H1 = ln 4
    close(entropy_from_logits(logits), [[1.0397208, 1.3862944]])
    close(logprobs_from_logits(logits, torch.tensor([[1, 3]])), [[-1.3862944, -1.3862944]])


def test_low_precision_logits_are_upcast():
    logits = torch.randn(2, 3, 5).bfloat16()
    assert logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long)).dtype == torch.float32
    assert entropy_from_logits(logits).dtype == torch.float32


# --- KL estimators and per-token rewards ---------------------------------------------------------


def test_kl_estimators_on_known_values():
    logp, ref = t([0.0, -1.0, -2.0]), t([-1.0, 0.0, -2.0])  # d = logp - ref = [1, -1, 0]
    close(kl_estimate(logp, ref, "k1"), [1.0, -1.0, 0.0])  # k1 can be negative
    close(kl_estimate(logp, ref, "k2"), [0.5, 0.5, 0.0])
    # k3 = r - 1 - log r, r = exp(-d): d=1 -> e^-1 - 1 + 1 = 0.3678794; d=-1 -> e - 1 - 1 = 0.7182818
    k3 = kl_estimate(logp, ref, "k3")
    close(k3, [0.3678794, 0.7182818, 0.0])
    assert (kl_estimate(t([0.3, -5.0, 2.0]), t([-0.3, 1.0, 2.5]), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    # p = [.5, .3, .2], q = [.2, .5, .3]: KL(p||q) = .5 ln 2.5 + .3 ln .6 + .2 ln(2/3)
    #   = 0.4581454 - 0.1532477 - 0.0810930 = 0.2238047. Expectation under p, taken exactly.
    p, q = t([0.5, 0.3, 0.2]), t([0.2, 0.5, 0.3])
    for kind in ("k1", "k3"):
        close((p * kl_estimate(p.log(), q.log(), kind)).sum(), 0.2238047)


def test_token_rewards_puts_score_on_last_real_token():
    score = t([3.0, -1.0])
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-0.1, -0.7, -2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = token_rewards(score, logp, ref, mask, kl_coef=0.1)
    # k1: row 0 [0.5, -1.0, 0.0]; row 1 [-0.2, 0.0, pad -> 0]
    close(kl, [[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]])
    # -0.1 * kl, plus score at index 2 (row 0) and index 1 (row 1); padding stays 0
    close(rewards, [[-0.05, 0.1, 3.0], [0.02, -1.0, 0.0]])
    # k2 for row 1: 0.5 * 0.04 = 0.02 -> reward -0.002
    rewards2, kl2 = token_rewards(score, logp, ref, mask, kl_coef=0.1, kl_kind="k2")
    close(kl2, [[0.125, 0.5, 0.0], [0.02, 0.0, 0.0]])
    close(rewards2, [[-0.0125, -0.05, 3.0], [-0.002, -1.0, 0.0]])


def test_token_rewards_rejects_a_row_without_tokens():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        token_rewards(torch.zeros(2), z, z, torch.tensor([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1)


# --- GAE -----------------------------------------------------------------------------------------


def test_gae_hand_computed_with_padded_row():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = t([[0.1, 0.0, -0.2, 1.0], [0.0, 2.0, 9.0, 9.0]])  # 9s are padding junk
    values = t([[0.5, 0.4, 0.3, 0.2], [1.0, 0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # Row 0, backwards (V after the end = 0):
    #   t3: delta = 1.0 - 0.2 = 0.8                     A3 = 0.8
    #   t2: delta = -0.2 + 0.9*0.2 - 0.3 = -0.32        A2 = -0.32 + 0.72*0.8 = 0.256
    #   t1: delta = 0 + 0.9*0.3 - 0.4 = -0.13           A1 = -0.13 + 0.72*0.256 = 0.05432
    #   t0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04         A0 = -0.04 + 0.72*0.05432 = -0.0008896
    # Row 1 (ends at t1):
    #   t1: delta = 2.0 - 0.5 = 1.5                     A1 = 1.5
    #   t0: delta = 0.9*0.5 - 1.0 = -0.55               A0 = -0.55 + 0.72*1.5 = 0.53
    close(adv, [[-0.0008896, 0.05432, 0.256, 0.8], [0.53, 1.5, 0.0, 0.0]])
    close(ret, [[0.4991104, 0.45432, 0.556, 1.0], [1.53, 2.0, 0.0, 0.0]])


def test_gae_with_gamma_lam_1_is_reward_to_go_minus_value():
    rewards = t([[0.0, 2.0, 9.0]])
    values = t([[1.0, 0.5, 9.0]])
    adv, ret = gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=1.0, lam=1.0)
    close(adv, [[1.0, 1.5, 0.0]])  # 2 - 1, 2 - 0.5
    close(ret, [[2.0, 2.0, 0.0]])


def test_gae_matches_the_explicit_sum_on_random_rows():
    # A_t = sum_l (gamma lam)^l delta_{t+l}, written as a plain double loop over each row.
    g = torch.Generator().manual_seed(1)
    B, T, gamma, lam = 3, 6, 0.95, 0.7
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [6, 3, 1]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    expected = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        r, v = rewards[b].tolist(), values[b].tolist() + [0.0]
        v[n] = 0.0
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(n):
            expected[b, i] = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i))
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)


# --- losses --------------------------------------------------------------------------------------


def test_policy_loss_clipping_in_both_directions():
    eps = 0.2
    # Tokens (ratio, A): (1.1, 1) inside; (1.5, 2) above, A>0; (0.5, 2) below, A>0;
    #                    (1.5, -1) above, A<0; (0.5, -1) below, A<0; one padded token.
    ratio = t([[1.1, 1.5, 0.5], [1.5, 0.5, 3.0]])
    adv = t([[1.0, 2.0, 2.0], [-1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old_logp = t([[-1.0, -2.0, -0.5], [-1.2, -0.1, -3.0]])
    logp = (old_logp + ratio.log()).requires_grad_()
    loss, stats = policy_loss(logp, old_logp, adv, mask, clip_range=eps)
    # per token max(-A r, -A clip(r)):
    #   (1.1, 1):  -1.1 vs -1.1 -> -1.1
    #   (1.5, 2):  -3.0 vs -2.4 -> -2.4   clipped
    #   (0.5, 2):  -1.0 vs -1.6 -> -1.0
    #   (1.5,-1):   1.5 vs  1.2 ->  1.5
    #   (0.5,-1):   0.5 vs  0.8 ->  0.8   clipped
    # mean = (-1.1 - 2.4 - 1.0 + 1.5 + 0.8) / 5 = -0.44
    close(loss.detach(), -0.44)
    close(stats["clipfrac"], 0.4)
    close(stats["ratio_mean"], 1.02)  # 5.1 / 5
    # approx_kl = mean(r - 1 - ln r): 1.1 -> 0.0046898; 1.5 -> 0.0945349 (x2); 0.5 -> 0.1931472 (x2)
    close(stats["approx_kl"], 0.1160108)
    # d loss / d logp = -A r / 5 where unclipped, 0 where clipped or padded
    loss.backward()
    close(logp.grad, [[-0.22, 0.0, -0.2], [0.3, 0.0, 0.0]])


def test_policy_loss_on_policy_is_minus_mean_advantage():
    logp = t([[-1.0, -2.0], [-0.5, -9.0]])
    loss, stats = policy_loss(logp, logp.clone(), t([[1.0, -3.0], [0.5, 50.0]]), torch.tensor([[1, 1], [1, 0]]))
    close(loss, 0.5)  # -(1 - 3 + 0.5) / 3
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)


def test_value_loss_clipping():
    eps = 0.2
    values = t([[1.0, 1.5, 1.5], [0.0, 100.0, 0.0]]).requires_grad_()
    old = t([[0.9, 1.0, 1.0], [1.0, 0.0, 0.0]])
    returns = t([[1.5, 2.0, 1.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=eps)
    # (v, old, R) -> v_clip, (v-R)^2, (v_clip-R)^2, max:
    #   (1.0, 0.9, 1.5) -> 1.0, 0.25, 0.25 -> 0.25
    #   (1.5, 1.0, 2.0) -> 1.2, 0.25, 0.64 -> 0.64   clipped
    #   (1.5, 1.0, 1.0) -> 1.2, 0.25, 0.04 -> 0.25
    #   (0.0, 1.0, 2.0) -> 0.8, 4.00, 1.44 -> 4.00
    # loss = 0.5 * 5.14 / 4 = 0.6425
    close(loss.detach(), 0.6425)
    close(stats["vf_clipfrac"], 0.25)
    loss.backward()
    # d/dv 0.5 * (v - R)^2 / 4 = (v - R) / 4 on unclipped tokens; 0 on the clipped one and padding
    close(values.grad, [[-0.125, 0.0, 0.125], [-0.5, 0.0, 0.0]])


# --- KL controllers ------------------------------------------------------------------------------


def test_adaptive_kl_controller_arithmetic_and_error_clip():
    c = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    c.update(current_kl=9.0, n_steps=256)  # error 9/6 - 1 = 0.5 -> clipped to 0.2
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # 0.201024
    assert c.value == pytest.approx(0.201024)
    c.update(current_kl=5.4, n_steps=1000)  # error -0.1, inside the clip: x (1 - 0.01)
    assert c.value == pytest.approx(0.19901376)
    c.update(current_kl=0.0, n_steps=5000)  # error -1 -> clipped to -0.2: x (1 - 0.1)
    assert c.value == pytest.approx(0.179112384)
    c.update(current_kl=6.0, n_steps=5000)  # on target: unchanged
    assert c.value == pytest.approx(0.179112384)

    resumed = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(c.state_dict())
    assert resumed.value == c.value
    with pytest.raises(ValueError):
        AdaptiveKLController(init_kl_coef=0.2, target=0.0, horizon=10000)


def test_fixed_kl_controller_never_changes():
    c = FixedKLController(0.05)
    c.update(current_kl=100.0, n_steps=1000)
    assert c.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(c.state_dict())
    assert other.value == 0.05
