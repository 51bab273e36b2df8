"""Masked reductions over token tensors, and ``whiten`` (for --normalize-advantages).

Masks are treated as booleans (nonzero = counts). Values at masked-out positions are never multiplied in:
we select with ``torch.where`` so that a NaN/inf sitting in padding cannot leak into a sum (``nan * 0`` is
NaN). Reductions run in float32 or wider even for bf16 inputs, because long bf16 sums lose most digits.
"""

from __future__ import annotations

import torch
from torch import Tensor

STD_EPS = 1e-6  # added to the std (not the variance); same constant and placement as GRPO


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set, over ``dim`` (all elements if None), in >= float32."""
    vals = torch.where(mask.bool(), x.to(_acc_dtype(x)), 0.0)
    return vals.sum() if dim is None else vals.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` is set. An empty selection gives 0, not NaN (count clamped to 1)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_std(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased (n-1) std over all masked elements; 0 when fewer than two elements are selected."""
    m = mask.bool()
    count = m.sum()
    centered = torch.where(m, x.to(_acc_dtype(x)) - masked_mean(x, m), 0.0)
    var = centered.square().sum() / (count - 1).clamp(min=1)
    return var.sqrt()


def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = STD_EPS) -> Tensor:
    """``(x - mean) / (std + eps)`` with mean and unbiased std over all masked tokens; masked-out -> 0.

    Why: --normalize-advantages rescales token advantages to unit scale over the whole batch so the
    step size does not depend on the reward scale. The statistics are token-weighted, so long responses
    weigh more than short ones; that is the usual convention (OpenRLHF, verl) and is intended here.

    Hazards: the statistics are over *this tensor only*. Under data parallelism each rank sees a different
    slice, so per-rank whitening gives per-rank scales; whiten before sharding (or all-reduce sum, sum of
    squares and count yourself) if that matters. With ``shift_mean=False`` only the scale is changed,
    which keeps the sign of every advantage (useful when advantages are already centred per group).
    """
    m = mask.bool()
    xf = x.to(_acc_dtype(x))
    mean = masked_mean(xf, m)
    std = masked_std(xf, m)
    out = (xf - mean) if shift_mean else xf
    return torch.where(m, out / (std + eps), 0.0)
