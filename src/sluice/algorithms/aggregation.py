"""Reduce a per-token tensor ``[B, T]`` and its mask to the scalar loss of a micro-batch.

The contract (what every mode guarantees): for an optimizer step whose B sequences are split along the
batch dimension into micro-batches,

    sum over micro-batches of aggregate(x_mb, mask_mb, mode, num_tokens=N, num_sequences=S)
        == aggregate(x_full, mask_full, mode, num_tokens=N, num_sequences=S)

where ``N`` (masked tokens) and ``S`` (sequences) are counted over the WHOLE optimizer step, not the
micro-batch. So gradient accumulation by plain summation reproduces the full-batch gradient, whatever
the micro-batch sizes or packing. Dividing each micro-batch by its own token count instead would weight
tokens of short micro-batches more, and the step's loss would depend on how it was split.

Modes (registered under kind "aggregation"):

* ``token_mean``: ``sum(x * mask) / N``; every trained token of the step weighs the same.
* ``seq_mean_token_mean``: ``sum_i (mean over trained tokens of seq i) / S``; every sequence weighs the
  same (sequences with no trained token contribute 0 but still count in S if you count them).
* ``seq_mean_token_sum``: ``sum_i (sum over trained tokens of seq i) / S``.
* ``seq_mean_token_sum_norm`` (Dr.GRPO): ``sum_i (token sum of seq i / max_len) / S`` with a constant
  ``max_len`` (e.g. the max response length), removing the length bias of per-sequence means.

Hazards: the per-sequence modes need each sequence whole inside one call (a sequence split across
context-parallel ranks must have its token counts all-reduced first). Under data parallelism, N and S
count all ranks; if the gradient all-reduce *averages* over ranks (the DDP/FSDP default), multiply the
loss by the world size to keep the contract. Counts may be ints or 0-d tensors (no host sync); they are
clamped to >= 1 so an all-masked step gives 0, not NaN. Masked-out values are selected away with
``torch.where`` (a NaN in padding cannot leak); the sum runs in float32 or wider.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.algorithms.masked import masked_sum
from sluice.algorithms.registry import get, register

KIND = "aggregation"
Count = int | Tensor


def _at_least_one(n: Count) -> Count:
    return n.clamp(min=1) if isinstance(n, Tensor) else max(n, 1)


@register(KIND, "token_mean")
def token_mean(
    x: Tensor, mask: Tensor, *, num_tokens: Count, num_sequences: Count, max_len: int | None = None
) -> Tensor:
    return masked_sum(x, mask) / _at_least_one(num_tokens)


@register(KIND, "seq_mean_token_mean")
def seq_mean_token_mean(
    x: Tensor, mask: Tensor, *, num_tokens: Count, num_sequences: Count, max_len: int | None = None
) -> Tensor:
    per_seq = masked_sum(x, mask, dim=-1) / mask.bool().sum(dim=-1).clamp(min=1)
    return per_seq.sum() / _at_least_one(num_sequences)


@register(KIND, "seq_mean_token_sum")
def seq_mean_token_sum(
    x: Tensor, mask: Tensor, *, num_tokens: Count, num_sequences: Count, max_len: int | None = None
) -> Tensor:
    return masked_sum(x, mask) / _at_least_one(num_sequences)


@register(KIND, "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    x: Tensor, mask: Tensor, *, num_tokens: Count, num_sequences: Count, max_len: int | None = None
) -> Tensor:
    if max_len is None or max_len <= 0:
        raise ValueError("seq_mean_token_sum_norm needs a positive constant max_len")
    return masked_sum(x, mask) / max_len / _at_least_one(num_sequences)


def aggregate(
    x: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: Count,
    num_sequences: Count,
    max_len: int | None = None,
) -> Tensor:
    """Scalar loss of ``x [B, T]`` under ``mask [B, T]``; see the module docstring for the contract."""
    if x.shape != mask.shape or x.dim() != 2:
        raise ValueError(f"x and mask must both be [B, T]; got {tuple(x.shape)} and {tuple(mask.shape)}")
    fn = get(KIND, mode)
    return fn(x, mask, num_tokens=num_tokens, num_sequences=num_sequences, max_len=max_len)
