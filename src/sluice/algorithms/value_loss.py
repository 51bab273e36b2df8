"""The critic's loss for PPO (clipped value regression) and the explained variance of its predictions.

``clipped_value_loss(values, old_values, returns, value_clip)`` follows PPO2 / OpenAI baselines:

    V_clip = V_old + clamp(V - V_old, -value_clip, value_clip)
    loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)

``V_old`` are the critic's values when the rollout was scored (the anchor), ``R`` the GAE returns (the target).
Like the policy clip, this is pessimistic: once a value has moved more than ``value_clip`` away from its anchor
in the direction that lowers the error, its gradient is 0, so one batch cannot drag the critic far. The 0.5
makes the gradient ``V - R``. Reduce the per-token loss with ``aggregate`` and the loss mask.

Hazard: ``value_clip`` is in reward units, so it must match the reward scale (0.2 suits rewards in [0, 1]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.algorithms.masked import masked_mean


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, value_clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped value loss ``[B, T]`` and ``stats['clipfrac']``: 1.0 where the clipped branch is the
    larger one (the token's gradient is cut), else 0.0. ``old_values`` and ``returns`` are detached here."""
    if not value_clip > 0:
        raise ValueError(f"value_clip must be > 0, got {value_clip}")
    v, old, target = _f32(values), _f32(old_values).detach(), _f32(returns).detach()
    v_clipped = old + torch.clamp(v - old, -value_clip, value_clip)
    unclipped = (v - target).square()
    clipped = (v_clipped - target).square()
    loss = 0.5 * torch.maximum(unclipped, clipped)
    return loss, {"clipfrac": (clipped > unclipped).float()}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over the tokens where ``mask`` is set, in float64.

    1: the critic predicts the returns exactly; 0: no better than their mean; < 0: worse than the mean.
    Both variances use the same divisor, so n vs n-1 cancels. 0.0 when ``Var(R)`` is 0 (e.g. every reward of
    the batch equal): the ratio is undefined there, and a NaN would poison the metrics log.
    """
    m = mask.bool()
    r = torch.where(m, returns.double(), 0.0)
    residual = torch.where(m, returns.double() - values.double(), 0.0)

    def variance(x: Tensor) -> float:
        centred = torch.where(m, x - masked_mean(x, m), 0.0)
        return centred.square().sum().item()

    var_r = variance(r)
    return 0.0 if var_r == 0.0 else 1.0 - variance(residual) / var_r
