"""Hand-computed and reference checks for sluice.algorithms (fast, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sluice.algorithms as A
from sluice.algorithms import registry

EPS = 1e-6
T = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------- registry
def test_registry_errors_list_valid_names():
    with pytest.raises(KeyError, match="grpo.*rloo"):
        registry.get("advantage", "nope")
    with pytest.raises(KeyError, match="known kinds"):
        registry.get("no_such_kind", "x")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("advantage", "grpo")(lambda r: r)
    assert registry.get("advantage", "gspo") is A.grpo and registry.get("advantage", "cispo") is A.grpo


# --------------------------------------------------------------------------------------------- advantages
def test_grpo_hand_values_unbiased_std():
    adv, metrics = A.grpo(T([[1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 2.0]]))
    a = 0.5 / (math.sqrt(1 / 3) + EPS)  # std with n-1 of [1,0,0,1] is sqrt(1/3)
    close(adv[0], [a, -a, -a, a])
    s = math.sqrt(2 / 3)  # [1,2,3,2]: mean 2, sum sq dev 2, /3
    close(adv[1], [-1 / (s + EPS), 0, 1 / (s + EPS), 0])
    assert metrics["zero_std_group_frac"] == 0.0
    close(metrics["reward_mean"], 1.25)


def test_dr_grpo_and_rloo_hand_values():
    r = T([[1.0, 2.0, 3.0]])
    close(A.dr_grpo(r)[0], [[-1.0, 0.0, 1.0]])
    close(A.rloo(r)[0], [[1 - 2.5, 2 - 2.0, 3 - 1.5]])


def test_reinforce_plus_plus_baseline_sample_uses_the_samples_std():
    adv, _ = A.reinforce_plus_plus_baseline_sample(T([[1.0, 0.0], [3.0, 3.0]]))
    s = math.sqrt(0.5 / 3)  # centred [.5,-.5,0,0], unbiased over the 4 samples
    close(adv, [[0.5 / (s + EPS), -0.5 / (s + EPS)], [0.0, 0.0]])


# Rewards [[1, 0], [3, 3]] centred per group: [0.5, -0.5, 0, 0]; responses of 2, 1, 1 and 3 trained tokens.
RPP_MASK = T([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]])


def test_reinforce_plus_plus_baseline_whitens_over_tokens_as_slime_and_verl():
    adv, metrics = A.reinforce_plus_plus_baseline(T([0.5, -0.5, 0.0, 0.0]), RPP_MASK)
    # 7 trained tokens: 0.5, 0.5 | -0.5 | 0 | 0, 0, 0. Mean 0.5 / 7 = 1/14; the deviations 3/7, 3/7, -4/7 and
    # four of -1/14 square to 35/49, so the unbiased variance is (35/49) / 6 = 5/42.
    mean, std = 1 / 14, math.sqrt(5 / 42)
    a = lambda v: (v - mean) / (std + EPS)  # noqa: E731
    close(adv, [[a(0.5), a(0.5), 0.0], [a(-0.5), 0.0, 0.0], [a(0.0), 0.0, 0.0], [a(0.0), a(0.0), a(0.0)]])
    close(metrics["return_mean"], mean)
    # The sample-level form gives another scale and leaves a group-mean sample at exactly 0.
    sample_form, _ = A.reinforce_plus_plus_baseline_sample(T([[1.0, 0.0], [3.0, 3.0]]))
    assert abs(adv[0, 0].item() - sample_form[0, 0].item()) > 0.01 and adv[2, 0].item() != 0.0  # 1.242 vs 1.225


def test_reinforce_plus_plus_baseline_subtracts_the_token_kl_before_whitening():
    kl = T([[0.2, 0.0, 9.0], [1.0, 9.0, 9.0], [0.0, 9.0, 9.0], [0.4, 0.2, 0.0]])  # 9.0: off the mask, ignored
    adv, _ = A.reinforce_plus_plus_baseline(T([0.5, -0.5, 0.0, 0.0]), RPP_MASK, kl, kl_coef=0.5)
    tokens = [0.5 - 0.1, 0.5, -0.5 - 0.5, 0.0, -0.2, -0.1, 0.0]  # r - 0.5 * kl on the 7 trained tokens
    mean = sum(tokens) / 7
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / 6)
    a = [(t - mean) / (std + EPS) for t in tokens]
    close(adv, [[a[0], a[1], 0.0], [a[2], 0.0, 0.0], [a[3], 0.0, 0.0], [a[4], a[5], a[6]]])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline_sample", "gspo", "cispo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_groups_and_singletons_give_exact_zeros(name, dtype):
    fn = registry.get("advantage", name)
    # in float64, mean([0.1]*3) != 0.1 by an ulp: without the explicit guard GRPO returns ~1e-11, not 0
    adv, metrics = fn(T([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7]], dtype=dtype))
    assert adv.dtype == dtype and torch.equal(adv, torch.zeros(2, 3, dtype=dtype))
    assert metrics["zero_std_group_frac"] == 1.0
    adv1, _ = fn(T([[1.0], [0.0]]))
    assert torch.equal(adv1, torch.zeros(2, 1))


def test_broadcast_to_tokens():
    mask = T([[1, 1, 0], [0, 1, 1]])
    close(A.broadcast_to_tokens(T([2.0, -1.0]), mask), [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]])
    with pytest.raises(ValueError):
        A.broadcast_to_tokens(T([1.0, 2.0, 3.0]), mask)


def _gae_reference(r, v, mask, gamma, lambd):
    adv = torch.zeros_like(r, dtype=torch.float64)
    for b in range(r.shape[0]):
        idx = [t for t in range(r.shape[1]) if mask[b, t]]
        last, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = float(r[b, t]) + gamma * next_v - float(v[b, t])
            last = delta + gamma * lambd * last
            next_v = float(v[b, t])
            adv[b, t] = last
    return adv, torch.where(mask.bool(), adv + v.double(), 0.0)


@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (0.9, 0.95), (0.99, 0.0)])
def test_gae_matches_python_loop(gamma, lambd):
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    mask = (torch.rand(4, 9, generator=g) > 0.3).int()
    mask[3] = 0  # an empty row
    adv, ret = A.gae(r, v, mask, gamma, lambd)
    ref_adv, ref_ret = _gae_reference(r, v, mask, gamma, lambd)
    close(adv, ref_adv, 1e-5)
    close(ret, ref_ret, 1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_and_reinforce_pp(gamma):
    mask = T([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    rew = A.token_level_rewards(T([1.0, 2.0]), mask, kl=torch.full((2, 5), 0.5), kl_coef=0.1)
    close(rew, [[-0.05, -0.05, 0, 0.95, 0], [-0.05, -0.05, -0.05, -0.05, 1.95]])
    adv, _ = A.reinforce_plus_plus(rew, mask, gamma, normalize=False)
    g = gamma
    row0 = [-0.05 + g * (-0.05 + g * 0.95), -0.05 + g * 0.95, 0.0, 0.95, 0.0]
    close(adv[0], row0)
    close(adv[1, 3], -0.05 + g * 1.95)
    white, _ = A.reinforce_plus_plus(rew, mask, gamma)
    close(white, A.whiten(adv, mask))


def test_whiten_masked_stats():
    x, mask = torch.randn(3, 7), torch.rand(3, 7) > 0.4
    w = A.whiten(x + 5.0, mask)
    close(A.masked_mean(w, mask), 0.0, 1e-5)
    close(w[mask].std(), 1.0, 1e-4)
    assert torch.all(w[~mask] == 0)


# -------------------------------------------------------------------------------------------- policy loss
def _lp(ratios):
    return torch.log(T(ratios, dtype=torch.float64)).float().requires_grad_(True)


def test_ppo_clip_hand_values_and_zero_grad_when_clipped():
    lp = _lp([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = T([1.0, 1.0, -1.0, -1.0, 2.0])
    loss, stats = A.ppo_clip(lp, torch.zeros(5), adv, 0.2)
    close(loss, [-1.2, -0.5, 1.5, 0.8, -2.2], 1e-5)
    close(stats["clipfrac"], [1.0, 0.0, 0.0, 1.0, 0.0])
    close(stats["ratio"], [1.5, 0.5, 1.5, 0.5, 1.1], 1e-5)
    close(stats["approx_kl"], -lp.detach())
    loss.sum().backward()
    clipped = stats["clipfrac"].bool()
    assert torch.all(lp.grad[clipped] == 0)
    close(lp.grad[~clipped], (-adv * stats["ratio"])[~clipped], 1e-5)  # d(-A r)/dlogp = -A r


def test_ppo_clip_higher_is_asymmetric():
    lp = _lp([1.25, 1.5, 0.75])
    adv = T([1.0, 1.0, -1.0])
    sym, s_sym = A.ppo_clip(lp, torch.zeros(3), adv, 0.2)
    asym, s_asym = A.ppo_clip(lp, torch.zeros(3), adv, 0.2, eps_clip_high=0.28)
    close(sym, [-1.2, -1.2, 0.8], 1e-5)
    close(asym, [-1.25, -1.28, 0.8], 1e-5)  # the upper bound moved, the lower one did not
    close(s_sym["clipfrac"], [1.0, 1.0, 1.0])
    close(s_asym["clipfrac"], [0.0, 1.0, 1.0])


def test_ppo_dual_clip():
    lp = _lp([5.0, 2.0, 5.0])
    adv = T([-1.0, -1.0, 1.0])
    loss, stats = A.ppo_clip(lp, torch.zeros(3), adv, 0.2, eps_clip_c=3.0)
    close(loss, [3.0, 2.0, -1.2], 1e-5)
    close(stats["dual_clipfrac"], [1.0, 0.0, 0.0])
    loss.sum().backward()
    assert lp.grad[0] == 0 and lp.grad[1] != 0
    with pytest.raises(ValueError):
        A.ppo_clip(lp, torch.zeros(3), adv, 0.2, eps_clip_c=0.5)


def test_ppo_log_ratio_clamp_keeps_loss_finite():
    lp = T([500.0, -500.0], requires_grad=True)
    loss, stats = A.ppo_clip(lp, torch.zeros(2), T([-1.0, 1.0]), 0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(lp.grad).all()
    close(stats["ratio"][0], math.exp(20.0), 1e-4)


def test_gspo_ratio_is_exp_of_masked_mean_and_gradient_matches_paper():
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 6, generator=g)
    lp = (old + 0.05 * torch.randn(3, 6, generator=g)).requires_grad_(True)
    mask = T([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask_b = mask.bool()
    adv_seq = T([1.0, -0.5, 2.0])
    lr = torch.where(mask_b, lp.detach() - old, 0.0)
    s = torch.exp(lr.sum(1) / mask.sum(1))
    loss, stats = A.gspo(lp, old, adv_seq[:, None].expand(3, 6), 10.0, loss_mask=mask)  # wide clip
    close(stats["ratio"], s[:, None].expand(3, 6), 1e-5)
    A.aggregate(loss, mask, "seq_mean_token_mean", num_tokens=int(mask.sum()), num_sequences=3).backward()
    # GSPO: J = -(1/B) sum_i A_i s_i(theta), differentiated directly
    lp2 = lp.detach().clone().requires_grad_(True)
    s2 = torch.exp(torch.where(mask_b, lp2 - old, 0.0).sum(1) / mask.sum(1))
    (-(adv_seq * s2).mean()).backward()
    close(lp.grad, lp2.grad, 1e-6)
    tight, st_ = A.gspo(lp, old, adv_seq[:, None].expand(3, 6), 1e-4, loss_mask=mask)
    assert torch.all(st_["clipfrac"] == st_["clipfrac"][:, :1])  # one clip decision per sequence
    with pytest.raises(ValueError):
        A.gspo(lp, old, adv_seq[:, None].expand(3, 6), 0.2)


def test_cispo_keeps_gradient_of_clipped_tokens():
    lp = _lp([2.0, 1.0, 0.5])
    adv = T([1.0, 1.0, -1.0])
    loss, stats = A.cispo(lp, torch.zeros(3), adv, 0.2, eps_clip_high=0.28)
    w = T([1.28, 1.0, 0.8])
    close(loss, -w * adv * lp.detach(), 1e-5)
    close(stats["clipfrac"], [1.0, 0.0, 1.0])
    loss.sum().backward()
    close(lp.grad, -w * adv, 1e-5)


# ---------------------------------------------------------------------------------------- kl, entropy, ...
def test_kl_hand_values():
    lp, ref = T([0.5, -1.0, 0.0]), T([0.0, 0.0, 0.0])
    close(A.kl_estimate(lp, ref, "k1"), [0.5, -1.0, 0.0])
    close(A.kl_estimate(lp, ref, "k2"), [0.125, 0.5, 0.0])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.e - 2, 0.0]
    close(A.kl_estimate(lp, ref, "k3"), k3)
    close(A.kl_estimate(lp, ref, "low_var_kl"), k3)
    close(A.kl_estimate(T([-100.0]), T([0.0]), "low_var_kl"), [10.0])  # clamped, not inf
    # slime's k3 is not clamped: only the log-ratio is (at 20, against overflow)
    close(A.kl_estimate(T([-3.0, -100.0]), T([0.0, 0.0]), "k3"), [math.exp(3) - 4, math.expm1(20) - 20])
    tiny = A.kl_estimate(T([0.0, 1e-6, -1e-6]), T([1e-6, 0.0, 0.0]), "k3")  # exp(x)-x-1 would cancel < 0
    assert (tiny >= 0).all() and (tiny <= 1e-11).all()
    with pytest.raises(KeyError, match="k1, k2, k3, low_var_kl"):
        A.kl_estimate(lp, ref, "k4")


@given(st.lists(st.floats(-30, 30), min_size=1, max_size=20), st.lists(st.floats(-30, 30), min_size=1, max_size=20))
@settings(max_examples=50, deadline=None)
def test_k3_nonnegative(a, b):
    n = min(len(a), len(b))
    k = A.kl_estimate(T(a[:n]), T(b[:n]), "k3")
    assert torch.isfinite(k).all() and (k >= 0).all()


def test_entropy():
    z = torch.randn(2, 5, 11) * 3
    h = A.entropy_from_logits(z)
    close(h, -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1), 1e-5)
    close(A.entropy_from_logits(z, chunk_size=3), h, 1e-6)
    close(A.entropy_from_logits(torch.zeros(4, 32000)), torch.full((4,), math.log(32000)), 1e-5)
    zi = T([[0.0, 0.0, -math.inf]], requires_grad=True)
    hi = A.entropy_from_logits(zi)
    hi.sum().backward()
    close(hi, [math.log(2)])
    assert torch.isfinite(zi.grad).all()


def test_log_probs_from_logits_and_sft():
    z, tok = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4))
    ref = torch.log_softmax(z / 0.7, -1).gather(-1, tok[..., None]).squeeze(-1)
    close(A.log_probs_from_logits(z, tok, 0.7), ref, 1e-5)
    close(A.log_probs_from_logits(z, tok, 0.7, chunk_size=3), ref, 1e-5)
    close(A.sft_nll(ref), -ref)


# ------------------------------------------------------------------------------------------- aggregation
def test_aggregation_hand_values():
    x = T([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    kw = dict(num_tokens=4, num_sequences=2)
    close(A.aggregate(x, mask, "token_mean", **kw), 10 / 4)
    close(A.aggregate(x, mask, "seq_mean_token_mean", **kw), (2 + 4) / 2)
    close(A.aggregate(x, mask, "seq_mean_token_sum", **kw), (6 + 4) / 2)
    close(A.aggregate(x, mask, "seq_mean_token_sum_norm", max_len=8, **kw), (6 / 8 + 4 / 8) / 2)
    close(A.aggregate(x, torch.zeros(2, 3), "token_mean", num_tokens=0, num_sequences=0), 0.0)


@st.composite
def _batches(draw):
    b, t = draw(st.integers(1, 7)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    cuts = sorted(set(draw(st.lists(st.integers(1, b), max_size=4))) - {b})
    return b, t, seed, cuts


@pytest.mark.parametrize("mode", registry.names("aggregation"))
@given(batch=_batches())
@settings(max_examples=40, deadline=None)
def test_micro_batch_sums_equal_full_batch(mode, batch):
    b, t, seed, cuts = batch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.4
    kw = dict(num_tokens=int(mask.sum()), num_sequences=b, max_len=t)
    full = A.aggregate(x, mask, mode, **kw)
    bounds = [0, *cuts, b]
    parts = sum(A.aggregate(x[i:j], mask[i:j], mode, **kw) for i, j in zip(bounds, bounds[1:]))
    close(parts, full, 1e-5)


# ------------------------------------------------------------------------------ properties (hypothesis)
_REWARD = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@st.composite
def _groups(draw, distinct: bool):
    """[num_groups, n] float64 rewards; with ``distinct`` every reward of a group differs."""
    n, num_groups = draw(st.integers(2, 8)), draw(st.integers(1, 4))
    rows = [draw(st.lists(_REWARD, min_size=n, max_size=n, unique=distinct)) for _ in range(num_groups)]
    return T(rows, dtype=torch.float64)


@given(_groups(distinct=True))
@settings(max_examples=60, deadline=None)
def test_grpo_advantages_sum_to_zero_in_each_group(rewards):
    for name in ("grpo", "dr_grpo", "rloo"):
        adv, _ = registry.get("advantage", name)(rewards)
        scale = 1.0 + adv.abs().max().item()
        assert torch.all(adv.sum(dim=1).abs() <= 1e-9 * scale * rewards.shape[1]), name


@given(value=_REWARD, n=st.integers(1, 8), num_groups=st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(value, n, num_groups):
    rewards = torch.full((num_groups, n), value, dtype=torch.float64)
    for name in registry.names("advantage"):
        adv, _ = registry.get("advantage", name)(rewards)
        assert torch.equal(adv, torch.zeros_like(adv)), name


@given(_groups(distinct=False))
@settings(max_examples=60, deadline=None)
def test_rloo_is_the_reward_minus_the_mean_of_the_others(rewards):
    adv, _ = A.rloo(rewards)
    n = rewards.shape[1]
    for g in range(rewards.shape[0]):
        for i in range(n):
            others = [rewards[g, j].item() for j in range(n) if j != i]
            expected = rewards[g, i].item() - sum(others) / len(others)
            assert adv[g, i].item() == pytest.approx(expected, abs=1e-9 * (1 + abs(expected)) + 1e-10)


# ------------------------------------------------------------------------ token estimators, by hand
def test_gae_hand_values_with_a_masked_hole():
    # Row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.8], gamma 0.9, lambda 0.8 (gamma * lambda = 0.72):
    #   d2 = 1 - 0.8 = 0.2                 A2 = 0.2
    #   d1 = 0.9 * 0.8 - 0.6 = 0.12        A1 = 0.12 + 0.72 * 0.2 = 0.264
    #   d0 = 0.9 * 0.6 - 0.5 = 0.04        A0 = 0.04 + 0.72 * 0.264 = 0.23008
    # Row 1: token 1 is masked (tool output: its 9 and 7 must not count), r = [0, -, 2], V = [1, -, 0.5]:
    #   d2 = 2 - 0.5 = 1.5                 A2 = 1.5
    #   d0 = 0.9 * 0.5 - 1 = -0.55         A0 = -0.55 + 0.72 * 1.5 = 0.53
    rewards, values = T([[0.0, 0.0, 1.0], [0.0, 9.0, 2.0]]), T([[0.5, 0.6, 0.8], [1.0, 7.0, 0.5]])
    mask = T([[1, 1, 1], [1, 0, 1]])
    adv, returns = A.gae(rewards, values, mask, gamma=0.9, lambd=0.8)
    close(adv, [[0.23008, 0.264, 0.2], [0.53, 0.0, 1.5]])
    close(returns, [[0.73008, 0.864, 1.0], [1.53, 0.0, 2.0]])  # A + V on trained tokens


def test_reinforce_plus_plus_hand_values_with_kl_penalty():
    # rewards [1, 0], kl_coef 0.1, k1 per token [[0.5, 1.0], [2.0, -]] (row 1 has one trained token), gamma 0.5:
    #   token rewards: [[-0.05, -0.1 + 1], [-0.2, -]] -> returns [[-0.05 + 0.5 * 0.9, 0.9], [-0.2, -]]
    mask = T([[1, 1], [1, 0]])
    token_rewards = A.token_level_rewards(T([1.0, 0.0]), mask, kl=T([[0.5, 1.0], [2.0, 5.0]]), kl_coef=0.1)
    close(token_rewards, [[-0.05, 0.9], [-0.2, 0.0]])
    returns = [0.4, 0.9, -0.2]
    mean = sum(returns) / 3
    std = math.sqrt(sum((g - mean) ** 2 for g in returns) / 2)  # unbiased, over all trained tokens of the batch
    adv, metrics = A.reinforce_plus_plus(token_rewards, mask, gamma=0.5)
    close(adv, [[(0.4 - mean) / (std + EPS), (0.9 - mean) / (std + EPS)], [(-0.2 - mean) / (std + EPS), 0.0]])
    close(metrics["return_mean"], mean)


def test_kl_penalized_rewards_subtract_the_summed_kl_of_trained_tokens():
    kl = T([[0.5, 1.0, 9.0], [2.0, 0.1, 9.0]])
    mask = T([[1, 1, 0], [1, 1, 0]])
    close(A.kl_penalized_rewards(T([1.0, 0.0]), kl, mask, 0.1), [1.0 - 0.15, 0.0 - 0.21])


# ---------------------------------------------------------------------------------------- value loss
def test_clipped_value_loss_hand_values_and_gradient():
    # old 0.5 everywhere, value_clip 0.2 (values may move to [0.3, 0.7] before the clip bites):
    #   a: V 1.0 -> clipped 0.7, R 2.0: max((1-2)^2, (0.7-2)^2) = 1.69 from the clipped branch: gradient 0
    #   b: V 0.1 -> clipped 0.3, R 0.0: max(0.01, 0.09) = 0.09 clipped: gradient 0
    #   c: V 0.5 (not moved),   R 0.6: 0.01 either way: gradient V - R = -0.1
    #   d: V 0.9 -> clipped 0.7, R 0.75: max(0.0225, 0.0025): the unclipped branch, gradient V - R = 0.15
    values = T([1.0, 0.1, 0.5, 0.9], requires_grad=True)
    loss, stats = A.clipped_value_loss(values, torch.full((4,), 0.5), T([2.0, 0.0, 0.6, 0.75]), 0.2)
    close(loss, [0.5 * 1.69, 0.5 * 0.09, 0.5 * 0.01, 0.5 * 0.0225])
    close(stats["clipfrac"], [1.0, 1.0, 0.0, 0.0])
    loss.sum().backward()
    close(values.grad, [0.0, 0.0, -0.1, 0.15])
    with pytest.raises(ValueError, match="value_clip"):
        A.clipped_value_loss(values, values, values, 0.0)


def test_explained_variance_hand_values():
    mask = T([[1, 1, 1, 0]])
    returns = T([[1.0, 3.0, 2.0, 100.0]])  # the masked 100 must not count
    # residual R - V = [0, 0.5, -0.5]: sum of squares about its mean 0.5; R about its mean 2: 2 -> 1 - 0.5 / 2
    assert A.explained_variance(T([[1.0, 2.5, 2.5, -7.0]]), returns, mask) == pytest.approx(0.75)
    assert A.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert A.explained_variance(T([[0.0, 0.0, 0.0, 0.0]]), T([[1.0, 1.0, 1.0, 5.0]]), mask) == 0.0  # Var(R) = 0


def test_the_trainer_uses_slimes_token_form_under_slimes_name():
    """compute_advantages with --advantage-estimator reinforce_plus_plus_baseline (and _sample) on ragged groups."""
    from sluice.config import AlgorithmConfig
    from sluice.trainer.batch_advantages import compute_advantages
    from sluice.types import TrainBatch

    zeros = torch.zeros(4, 3)
    batch = TrainBatch(input_ids=torch.zeros(4, 4, dtype=torch.long), attention_mask=torch.ones(4, 4),
                       loss_mask=RPP_MASK.float(), advantages=zeros, rollout_log_probs=zeros)
    rewards = [[1.0, 0.0], [3.0, 3.0]]
    token = compute_advantages(None, batch, AlgorithmConfig(advantage_estimator="reinforce_plus_plus_baseline"),
                               rewards)
    close(token.token_advantages, A.reinforce_plus_plus_baseline(T([0.5, -0.5, 0.0, 0.0]), RPP_MASK)[0])
    sample = compute_advantages(None, batch, AlgorithmConfig(
        advantage_estimator="reinforce_plus_plus_baseline_sample"), rewards)
    s = math.sqrt(0.5 / 3)
    close(sample.token_advantages, [[0.5 / (s + EPS)] * 2 + [0.0], [-0.5 / (s + EPS), 0.0, 0.0], [0.0] * 3, [0.0] * 3])
    raw = compute_advantages(None, batch, AlgorithmConfig(advantage_estimator="reinforce_plus_plus_baseline",
                                                          disable_rewards_normalization=True), rewards)
    close(raw.token_advantages, A.reinforce_plus_plus_baseline(T([1.0, 0.0, 3.0, 3.0]), RPP_MASK)[0])


@pytest.mark.parametrize("estimator", ["grpo", "gspo", "cispo"])
def test_disable_grpo_std_normalization_drops_the_std_of_every_grpo_advantage(estimator):
    from sluice.trainer.batching import group_advantages

    rewards = [[1.0, 0.0, 0.0, 0.0]]
    close(group_advantages(estimator, rewards, disable_std_normalization=True), [0.75, -0.25, -0.25, -0.25])
    s = math.sqrt(0.75 / 3)  # unbiased std of the centred group
    close(group_advantages(estimator, rewards), [0.75 / (s + EPS)] + [-0.25 / (s + EPS)] * 3)
