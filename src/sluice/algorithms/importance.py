"""Off-policy correction weights between the trainer's old policy and the engine that sampled the tokens.

The engine samples with its own numerics (kernels, precision), so pi_engine != pi_trainer even at the same
weights. Each variant turns ``old_log_probs - rollout_log_probs`` (the log importance ratio of the trainer's
old policy over the engine's) into a detached weight per token that multiplies the policy loss:

* ``token`` (TIS): ``clamp(exp(old_t - rollout_t), low, high)`` per token.
* ``sequence``: ``clamp(exp(sum_t (old_t - rollout_t)), low, high)``, one weight per sequence (the exact
  sequence-level ratio, truncated), broadcast to its tokens.
* ``geometric``: ``clamp(exp(mean_t (old_t - rollout_t)), low, high)``, the geometric mean of the token
  ratios of a sequence: length-independent, far lower variance than ``sequence``.
* ``icepop``: 1 where ``exp(old_t - rollout_t)`` lies in ``[low, high]``, else 0: a token the two policies
  disagree on is dropped from the loss (still counted in the step's token count), not clipped.

Sums and means run over trained tokens (``loss_mask``) only. Signature of every variant:
``(old_log_probs[B, T], rollout_log_probs[B, T], loss_mask[B, T], low, high) -> (weight[B, T], stats)``,
``stats['clipped']`` a 0/1 float per token (for the sequence variants, the sequence's indicator broadcast).

Hazard: log-weights are clamped to +-20 before ``exp``. A sequence-level log-ratio sums over hundreds of
tokens and easily passes 88, where float32 ``exp`` overflows to inf; ``inf`` then clamps fine but
``inf * 0`` (a masked token) is NaN. At +-20 the weight is far outside any sane ``[low, high]``, so
the clamp changes nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.algorithms.registry import get, register

KIND = "importance"
LOG_WEIGHT_CLAMP = 20.0


def _log_ratio(old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor) -> Tensor:
    """``old - rollout`` in at least float32, detached, 0 on masked-out tokens (whatever padding holds)."""
    dtype = torch.promote_types(old_log_probs.dtype, torch.float32)
    diff = (old_log_probs.detach().to(dtype) - rollout_log_probs.detach().to(dtype))
    return torch.where(loss_mask.bool(), diff, torch.zeros_like(diff))


def _truncate(log_weight: Tensor, low: float, high: float) -> tuple[Tensor, dict[str, Tensor]]:
    raw = torch.exp(torch.clamp(log_weight, -LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP))
    weight = torch.clamp(raw, low, high)
    return weight, {"clipped": (weight != raw).to(weight.dtype)}


@register(KIND, "token")
def token(old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor, low: float, high: float
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated IS per token: ``clamp(exp(old - rollout), low, high)``."""
    return _truncate(_log_ratio(old_log_probs, rollout_log_probs, loss_mask), low, high)


@register(KIND, "sequence")
def sequence(old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor, low: float, high: float
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """One weight per sequence, ``clamp(exp(sum over trained tokens of (old - rollout)), low, high)``."""
    log_ratio = _log_ratio(old_log_probs, rollout_log_probs, loss_mask)
    weight, stats = _truncate(log_ratio.sum(dim=-1, keepdim=True), low, high)
    return weight.expand_as(log_ratio), {k: v.expand_as(log_ratio) for k, v in stats.items()}


@register(KIND, "geometric")
def geometric(old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor, low: float, high: float
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """One weight per sequence, ``clamp(exp(mean over trained tokens of (old - rollout)), low, high)``."""
    log_ratio = _log_ratio(old_log_probs, rollout_log_probs, loss_mask)
    num_tokens = loss_mask.to(log_ratio.dtype).sum(dim=-1, keepdim=True).clamp(min=1.0)  # empty row -> weight 1
    weight, stats = _truncate(log_ratio.sum(dim=-1, keepdim=True) / num_tokens, low, high)
    return weight.expand_as(log_ratio), {k: v.expand_as(log_ratio) for k, v in stats.items()}


@register(KIND, "icepop")
def icepop(old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor, low: float, high: float
           ) -> tuple[Tensor, dict[str, Tensor]]:
    """Mask (IcePop): weight 1 where ``exp(old - rollout)`` is in ``[low, high]``, else 0 (token dropped)."""
    raw = torch.exp(torch.clamp(_log_ratio(old_log_probs, rollout_log_probs, loss_mask),
                                -LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP))
    keep = (raw >= low) & (raw <= high)
    weight = keep.to(raw.dtype)
    return weight, {"clipped": 1.0 - weight}


def effective_sample_size(weight: Tensor, loss_mask: Tensor) -> float:
    """ESS fraction ``(sum w)^2 / (N * sum w^2)`` over the N trained tokens, in [0, 1] for w >= 0: 1 for equal
    weights, 1/N when one token carries all the weight, K/N for an icepop mask keeping K tokens.

    1.0 without trained tokens (nothing to correct); 0.0 when every weight is 0 (every token dropped).
    """
    w = torch.where(loss_mask.bool(), weight.to(torch.float64), torch.zeros((), dtype=torch.float64))
    num_tokens = loss_mask.bool().sum().item()
    sum_sq = w.square().sum().item()
    if num_tokens == 0:
        return 1.0
    if sum_sq == 0.0:
        return 0.0
    return w.sum().item() ** 2 / (num_tokens * sum_sq)


def importance_weight(mode: str, old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor,
                      low: float, high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The weight of the registered variant ``mode`` (token, sequence, geometric, icepop)."""
    return get(KIND, mode)(old_log_probs, rollout_log_probs, loss_mask, low, high)
