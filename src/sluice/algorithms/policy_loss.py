"""Per-token policy-gradient losses: PPO clip (with clip-higher and dual clip), GSPO, CISPO.

All take ``(log_probs, old_log_probs, advantages, eps_clip, eps_clip_high=None, eps_clip_c=None, *,
loss_mask=None)`` with ``[B, T]`` tensors (advantages already broadcast to tokens) and return
``(per_token_loss [B, T], stats)``; ``stats`` holds detached ``[B, T]`` tensors (``clipfrac`` as 0/1
floats, ``ratio``, ``approx_kl`` = old - new log-prob, the k1 estimate of KL(old || new)). Reduce both
with ``aggregate`` and the loss mask; values at masked-out positions are meaningless.

Numerical hazards, handled here:

* The log-ratio is clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` before ``exp``. A stale or
  off-policy token can have ``logp - old_logp`` in the hundreds, and ``exp`` overflows to inf in float32
  at ~88; ``inf * 0`` advantages then gives NaN, which poisons the whole batch through the mean. At
  +-20 the ratio (~5e8 or ~2e-9) is far outside any clip range, so the loss value is unaffected for the
  clipped branch; the clamp stops the gradient of such tokens, which are either clipped anyway or have
  a vanishing ratio.
* Inputs are upcast to float32: the difference of two bf16 log-probs has ~3 significant digits, so the
  ratio would be noise around 1. Compute log-probs in float32 upstream, too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.algorithms.registry import register

KIND = "policy_loss"
LOG_RATIO_CLAMP = 20.0


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, eps_clip: float, eps_clip_high: float | None, eps_clip_c: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pessimistic PPO surrogate on a given (already clamped) log-ratio."""
    hi = eps_clip if eps_clip_high is None else eps_clip_high
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_clip, 1.0 + hi)
    loss = torch.maximum(unclipped, clipped)
    stats = {"clipfrac": (clipped > unclipped).float()}
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(f"dual clip needs eps_clip_c > 1, got {eps_clip_c}")
        # Dual clip: with A < 0 and a huge ratio, the loss -A*r is unbounded; cap it at -A*c.
        cap = -advantages * eps_clip_c
        negative = advantages < 0
        stats["dual_clipfrac"] = (negative & (loss > cap)).float()
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    stats["ratio"] = ratio.detach()
    return loss, stats


@register(KIND, "ppo_clip")
def ppo_clip(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    *,
    loss_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO: ``max(-A*r, -A*clip(r, 1-eps_clip, 1+eps_clip_high))``, ``r = exp(logp - old_logp)``.

    ``eps_clip_high`` (clip-higher, DAPO) defaults to ``eps_clip``. ``eps_clip_c > 1`` enables dual clip for
    negative advantages: ``min(loss, -A*c)``. Clipped tokens have zero gradient. ``loss_mask`` is unused
    (the loss is token-local) and accepted for a uniform signature.
    """
    lp, old = _f32(log_probs), _f32(old_log_probs).detach()
    log_ratio = torch.clamp(lp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss, stats = _clipped_surrogate(log_ratio, _f32(advantages).detach(), eps_clip, eps_clip_high, eps_clip_c)
    stats["approx_kl"] = (old - lp).detach()
    return loss, stats


@register(KIND, "gspo")
def gspo(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    *,
    loss_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: clip a *sequence-level* ratio ``s_i = exp(mean_t (logp - old_logp))`` over trained tokens.

    Applied per token as ``s_{i,t} = sg(s_i) * exp(logp_t - sg(logp_t))`` (the paper's GSPO-token form):
    its value is ``s_i`` on every token (so the clip decision is per sequence) and its gradient is
    ``s_i * grad logp_t``. Reduced with ``seq_mean_token_mean`` this gives exactly the GSPO gradient
    ``A_i * s_i * mean_t grad logp_t``; ``token_mean`` instead weights sequences by their length.
    GSPO's clip ranges are much smaller than PPO's (the paper uses about 3e-4 / 4e-4).
    Hazard: the sequence mean is clamped to +-20 before ``exp`` like the token ratio of ``ppo_clip``.
    """
    if loss_mask is None:
        raise ValueError("gspo needs loss_mask to average the log-ratio over each sequence's tokens")
    m = loss_mask.bool()
    lp, old = _f32(log_probs), _f32(old_log_probs).detach()
    token_lr = torch.where(m, lp - old, 0.0)  # where, not *mask: padding may hold inf
    seq_lr = token_lr.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1)
    seq_lr = torch.clamp(seq_lr, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()
    log_ratio = seq_lr + (lp - lp.detach())  # value: seq_lr; d/dlogp_t: 1 (own token only)
    loss, stats = _clipped_surrogate(log_ratio, _f32(advantages).detach(), eps_clip, eps_clip_high, eps_clip_c)
    stats["approx_kl"] = (old - lp).detach()
    return loss, stats


@register(KIND, "cispo")
def cispo(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    *,
    loss_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1): ``-sg(clip(r, 1-eps_clip, 1+eps_clip_high)) * A * logp``.

    Why: PPO zeroes the gradient of clipped tokens, which drops rare high-ratio "fork" tokens entirely;
    CISPO clips the importance *weight* instead and keeps every token's gradient ``-w * A * grad logp``.
    The paper effectively disables the lower bound: pass ``eps_clip=1.0`` for that. Dual clip does not
    apply (the weight is already bounded), so ``eps_clip_c`` must be None. ``clipfrac`` counts tokens
    whose weight was clipped.
    """
    if eps_clip_c is not None:
        raise ValueError("cispo bounds the IS weight itself; dual clip (eps_clip_c) does not apply")
    hi = eps_clip if eps_clip_high is None else eps_clip_high
    lp, old = _f32(log_probs), _f32(old_log_probs).detach()
    ratio = torch.exp(torch.clamp(lp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).detach()
    weight = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + hi)
    loss = -weight * _f32(advantages).detach() * lp
    stats = {
        "clipfrac": (weight != ratio).float(),
        "ratio": ratio,
        "approx_kl": (old - lp).detach(),
    }
    return loss, stats
