"""Group-relative advantage estimators: one scalar reward per sample -> one scalar advantage per sample.

Every estimator takes ``rewards: Tensor[num_groups, n]`` (row g holds the n samples of prompt g) and returns
``(advantages: Tensor[num_groups, n], metrics: dict[str, float])``. Token-level broadcasting is a separate,
explicit step (:func:`broadcast_to_tokens`) so the per-sample value can be logged and tested on its own.

Numerics, shared by all estimators:

* Statistics are computed in float64: the tensors are tiny and it removes rounding from the mean.
* A group whose rewards are all equal gets exactly zero advantages. This is enforced explicitly: a float
  mean of identical values can differ from them by an ulp, and GRPO would then divide that ulp-sized
  residue by ``std + eps`` (also ulp-sized) and turn it into an advantage of order 1e-3 instead of 0.
* ``n == 1`` yields zeros (there is no baseline to compare against), never NaN. ``torch.std`` with the
  n-1 correction would return NaN for one element.
* ``metrics`` calls ``.item()``, i.e. a device sync; rewards are a few hundred numbers, so this is cheap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.algorithms.masked import STD_EPS
from sluice.algorithms.registry import register

KIND = "advantage"


def _check(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, n], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return torch.promote_types(rewards.dtype, torch.float32)


def _centered(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """``(r - group mean, group is constant)`` in float64; constant groups are exactly zero."""
    r = rewards.double()
    constant = (r.amax(dim=1) == r.amin(dim=1)).unsqueeze(1)
    centered = torch.where(constant, 0.0, r - r.mean(dim=1, keepdim=True))
    return centered, constant.squeeze(1)


def _group_std(centered: Tensor) -> Tensor:
    """Unbiased (n-1) std per group, [num_groups, 1]; 0 for n == 1."""
    n = centered.shape[1]
    return (centered.square().sum(dim=1, keepdim=True) / max(n - 1, 1)).sqrt()


def _metrics(rewards: Tensor, adv: Tensor, constant: Tensor) -> dict[str, float]:
    r = rewards.double()
    return {
        "reward_mean": r.mean().item(),
        "reward_std": r.std(correction=0).item() if r.numel() else 0.0,
        "advantage_mean": adv.double().mean().item(),
        "advantage_abs_max": adv.abs().max().item() if adv.numel() else 0.0,
        # groups that carry no learning signal; what dynamic sampling filters out
        "zero_std_group_frac": constant.double().mean().item(),
    }


@register(KIND, "grpo")
@register(KIND, "gspo")  # GSPO and CISPO change the loss, not the advantage
@register(KIND, "cispo")
def grpo(rewards: Tensor, eps: float = STD_EPS) -> tuple[Tensor, dict[str, float]]:
    """GRPO: ``(r - mean) / (std + eps)`` per group, std unbiased (n-1), eps added to the std.

    Hazard: with binary rewards and one success in a large group, the std is small and the lone success
    gets a large advantage (about sqrt(n)); that is intended by GRPO, and the reason Dr.GRPO drops it.
    """
    _check(rewards)
    centered, constant = _centered(rewards)
    if rewards.shape[1] == 1:
        adv = torch.zeros_like(centered)
    else:
        adv = centered / (_group_std(centered) + eps)
    adv = adv.to(_out_dtype(rewards))
    return adv, _metrics(rewards, adv, constant)


@register(KIND, "dr_grpo")
def dr_grpo(rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Dr.GRPO: ``r - mean``, no std division (removes the difficulty bias of the std normaliser)."""
    _check(rewards)
    centered, constant = _centered(rewards)
    adv = centered.to(_out_dtype(rewards))
    return adv, _metrics(rewards, adv, constant)


@register(KIND, "rloo")
def rloo(rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
    """RLOO: ``r_i - mean_{j != i} r_j`` = ``n/(n-1) * (r_i - mean)``; the leave-one-out baseline keeps the
    estimator unbiased (a sample's own reward is not in its baseline). ``n == 1`` -> zeros."""
    _check(rewards)
    n = rewards.shape[1]
    centered, constant = _centered(rewards)
    adv = centered * (n / (n - 1)) if n > 1 else torch.zeros_like(centered)
    adv = adv.to(_out_dtype(rewards))
    return adv, _metrics(rewards, adv, constant)


@register(KIND, "reinforce_plus_plus_baseline_sample")
def reinforce_plus_plus_baseline_sample(rewards: Tensor, eps: float = STD_EPS) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE++-baseline, sample-level form: subtract the group mean, then divide by the std over the
    *samples* of the whole batch.

    Why: the group mean removes prompt difficulty, while a single batch-wide scale (instead of GRPO's
    per-group std) does not blow up groups whose rewards barely differ. The centred values already have
    mean 0 over the batch, so no second shift is applied. The std is the unbiased (n-1) std over all
    num_groups * n samples, eps added to it: every sample weighs the same, whatever its length. slime and verl
    use the token-weighted form, which is sluice's ``reinforce_plus_plus_baseline`` (returns.py).
    Hazard: the batch is whatever you pass; under data parallelism pass the full rollout, not a shard.
    """
    _check(rewards)
    centered, constant = _centered(rewards)
    flat = centered.reshape(-1)
    std = (flat.square().sum() / max(flat.numel() - 1, 1)).sqrt()
    adv = (centered / (std + eps)).to(_out_dtype(rewards))
    return adv, _metrics(rewards, adv, constant)


def broadcast_to_tokens(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-sample advantages ``[B]`` -> per-token ``[B, T]``, zero where ``loss_mask`` is 0.

    ``[num_groups, n]`` input is accepted and flattened row-major (group-major sample order, the order
    the rollout produced). Masked-out tokens get exactly 0 so they cannot contribute even if a later
    step forgets the mask.
    """
    adv = advantages.reshape(-1)
    if loss_mask.dim() != 2 or loss_mask.shape[0] != adv.numel():
        raise ValueError(f"need advantages [B] and loss_mask [B, T]; got {adv.numel()} and {tuple(loss_mask.shape)}")
    return torch.where(loss_mask.bool(), adv.unsqueeze(1), 0.0).to(adv.dtype)
