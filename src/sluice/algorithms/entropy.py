"""Entropy of the categorical distribution given by logits, per position.

``H = logsumexp(z) - sum_v softmax(z)_v * z_v``: this form never takes ``log`` of a probability, so
tiny probabilities cannot produce ``0 * log 0`` NaNs. Computed in float32 (bf16 logits over a 150k
vocabulary lose the small terms). ``-inf`` logits (masked vocabulary entries) are replaced by the most
negative finite float first: their probability is then exactly 0 and ``0 * finite`` stays 0 in both
forward and backward (a bare ``-inf`` would give ``0 * -inf = NaN``).

Memory hazard: the float32 upcast of ``[N, V]`` logits is large (4 bytes * N * V); ``chunk_size`` bounds
it by processing rows in chunks. Under autograd each chunk still keeps its activations for backward,
so chunking mainly helps for logging entropy under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _entropy(z: Tensor) -> Tensor:
    z = z.float()
    z = torch.where(torch.isneginf(z), torch.finfo(z.dtype).min, z)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy (nats) over the last dim: ``[..., V] -> [...]`` in float32; ``chunk_size`` rows at a time."""
    if chunk_size is None:
        return _entropy(logits)
    flat = logits.reshape(-1, logits.shape[-1])
    parts = [_entropy(chunk) for chunk in flat.split(chunk_size, dim=0)]
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(logits.shape[:-1])
