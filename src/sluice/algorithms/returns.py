"""Token-level estimators: REINFORCE++ discounted returns, REINFORCE++-baseline (slime's and verl's token form)
and GAE (PPO with a critic).

Both walk each sequence backwards over the tokens where ``loss_mask`` is set. Masked-out tokens inside
a response (tool output in multi-turn rollouts, padding) are *transparent*: they carry no reward, are not
discounted over and pass the running return through unchanged, so the result equals running the
recursion on the subsequence of trained tokens. Their outputs are 0. The position after the last trained
token is terminal (value 0): a truncated response is not bootstrapped.

Hazards: these are targets, computed without gradient (``values`` is detached). The backward loop is
O(T) small kernels; for gamma == 1 REINFORCE++ uses a reverse cumsum instead. Inputs at masked positions
must be finite (they are selected away with ``torch.where``, never multiplied by 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.algorithms.masked import masked_mean, masked_sum, whiten
from sluice.algorithms.registry import register

KIND = "token_advantage"


def token_level_rewards(
    rewards: Tensor, loss_mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """Build ``[B, T]`` token rewards: ``-kl_coef * kl`` on every trained token, plus the scalar
    reward on the last trained token of each row (the usual REINFORCE++ / PPO reward shaping).

    A row with no trained token drops its reward (there is nowhere to put it).
    """
    m = loss_mask.bool()
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    out = torch.zeros(m.shape, dtype=dtype, device=m.device)
    if kl is not None and kl_coef != 0.0:
        out = torch.where(m, -kl_coef * kl.detach().to(dtype), out)
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, pos, -1).amax(dim=1)  # -1: row has no trained token
    rows = torch.nonzero(last >= 0).squeeze(1)
    out[rows, last[rows]] += rewards.reshape(-1).to(dtype)[rows]
    return out


def kl_penalized_rewards(rewards: Tensor, kl: Tensor, loss_mask: Tensor, kl_coef: float) -> Tensor:
    """Sequence-level KL shaping for the group estimators: ``r_i - kl_coef * sum_t kl_{i,t}`` over trained tokens.

    The summed per-token estimate is the KL of the whole response (k1 sums to the sequence log-ratio), so the
    group estimator then sees the KL-regularised return ``r - beta * KL`` as the reward and normalises it like
    any reward (RLOO, Ahmadian et al. 2024, shapes the reward this way). ``rewards [B]``, ``kl [B, T]``.
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    total = masked_sum(kl.detach().to(dtype), loss_mask, dim=-1)
    return rewards.reshape(-1).to(dtype) - kl_coef * total


def discounted_returns(token_rewards: Tensor, loss_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{next trained token}`` per row; 0 at masked-out positions."""
    m = loss_mask.bool()
    r = torch.where(m, token_rewards.detach().to(torch.promote_types(token_rewards.dtype, torch.float32)), 0.0)
    if gamma == 1.0:
        g = r.flip(1).cumsum(1).flip(1)
    else:
        g = torch.empty_like(r)
        running = torch.zeros_like(r[:, 0])
        for t in range(r.shape[1] - 1, -1, -1):
            running = torch.where(m[:, t], r[:, t] + gamma * running, running)
            g[:, t] = running
    return torch.where(m, g, 0.0)


@register(KIND, "reinforce_plus_plus")
def reinforce_plus_plus(
    token_rewards: Tensor, loss_mask: Tensor, gamma: float = 1.0, *, normalize: bool = True
) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE++: advantage = discounted token return, whitened over all trained tokens of the batch.

    ``token_rewards`` should already hold the KL penalty per token and the outcome reward on the last
    token (see :func:`token_level_rewards`). Without a critic or group baseline, the global whitening
    (mean shift + unbiased std, eps on the std) is what keeps the variance in check; pass
    ``normalize=False`` to get raw returns. Hazard: whitening is over this tensor only (see ``whiten``).
    """
    m = loss_mask.bool()
    returns = discounted_returns(token_rewards, m, gamma)
    adv = whiten(returns, m) if normalize else returns
    metrics = {"return_mean": masked_mean(returns, m).item(), "advantage_mean": masked_mean(adv, m).item()}
    return adv, metrics


@register(KIND, "reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(
    baselined_rewards: Tensor, loss_mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0
) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE++-baseline as slime and verl compute it: each sample's reward minus its group's mean, broadcast
    over its trained tokens, minus ``kl_coef * kl`` per token, then whitened over all trained tokens of the batch
    (mean shift and unbiased std, eps on the std).

    ``baselined_rewards [B]`` already has the group mean subtracted (slime does it when it post-processes the
    rollout's rewards); ``loss_mask`` and ``kl`` are ``[B, T]``. Unlike the sample-level form
    (``advantages.reinforce_plus_plus_baseline_sample``) the statistics are token-weighted: a long response
    counts once per token, so it pulls the mean and the scale more than a short one; and the whitening shifts
    the mean, so a sample whose reward equals its group's mean gets a nonzero advantage when the batch's token
    mean is not 0. Hazard: whitening is over this tensor only (see ``whiten``).
    """
    m = loss_mask.bool()
    dtype = torch.promote_types(baselined_rewards.dtype, torch.float32)
    per_token = torch.where(m, baselined_rewards.reshape(-1, 1).to(dtype), 0.0)
    if kl is not None and kl_coef != 0.0:
        per_token = torch.where(m, per_token - kl_coef * kl.detach().to(dtype), 0.0)
    adv = whiten(per_token, m)
    return adv, {"return_mean": masked_mean(per_token, m).item(), "advantage_mean": masked_mean(adv, m).item()}


@register(KIND, "gae")
def gae(
    token_rewards: Tensor, values: Tensor, loss_mask: Tensor, gamma: float = 1.0, lambd: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns ``(advantages, returns)``, both ``[B, T]``.

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lambd * A_next``, with "next" the
    next trained token (0 after the last one) and ``returns = A + V`` (the critic's regression target).
    Advantages are not whitened here; use ``whiten`` (--normalize-advantages) as PPO usually does.
    """
    m = loss_mask.bool()
    dtype = torch.promote_types(token_rewards.dtype, torch.float32)
    r = torch.where(m, token_rewards.detach().to(dtype), 0.0)
    v = torch.where(m, values.detach().to(dtype), 0.0)
    adv = torch.empty_like(r)
    next_value = torch.zeros_like(r[:, 0])
    last_gae = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        last_gae = torch.where(m[:, t], delta + gamma * lambd * last_gae, last_gae)
        next_value = torch.where(m[:, t], v[:, t], next_value)
        adv[:, t] = last_gae
    adv = torch.where(m, adv, 0.0)
    return adv, torch.where(m, adv + v, 0.0)
