"""Packing: the rows of a right-padded micro-batch laid back to back in one row, with no padding.

``pack_rows`` builds the packed row and, for every target position ``(b, t)`` of the padded layout (aligned
with ``input_ids[:, 1:]``), the packed position whose output belongs there: the output at packed position
``start_b + t`` predicts packed token ``start_b + t + 1`` = ``input_ids[b, t + 1]``. A model output computed on
the packed row (logprobs, entropy, values) is mapped back with ``Packing.unpack``, so everything downstream
(losses, masks, aggregation) sees the same ``[B, T-1]`` tensors as with padding.

Isolation: position ids restart at 0 for every sequence, and the model is called with ``attention_mask=None``.
Hugging Face models (transformers >= 5, masking_utils.find_packed_sequence_indices) then read a new sequence
wherever the position ids do not step by 1 and build a block-diagonal causal mask, so no token attends across
a sequence boundary (tests/test_packing.py checks this against one forward per sequence). Hazards: this needs
an attention implementation that honours that mask (eager, sdpa, flex, or flash-attention's own varlen path);
and the outputs at the last token of each sequence predict the next sequence's first token: they are garbage
and are never gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packing:
    """One packed row and the map back to the padded layout."""

    input_ids: Tensor  # [1, N] the real tokens of every row, back to back (N = total real tokens)
    position_ids: Tensor  # [1, N] 0, 1, ... restarting at each sequence
    target_index: Tensor  # [B, T-1] int64, packed position whose output belongs at padded target (b, t)
    target_valid: Tensor  # [B, T-1] bool, t < L_b - 1 (a real target inside row b)

    def unpack(self, packed: Tensor) -> Tensor:
        """Per-position outputs ``[N-1]`` (or ``[N]``) of the packed row -> ``[B, T-1]``, 0 at invalid targets."""
        index = self.target_index.clamp(max=packed.shape[0] - 1)
        return torch.where(self.target_valid, packed[index], torch.zeros((), dtype=packed.dtype, device=packed.device))


def pack_rows(input_ids: Tensor, attention_mask: Tensor) -> Packing:
    """Pack right-padded rows (``attention_mask`` 1 on a prefix of each row) into one row."""
    lengths = attention_mask.sum(dim=1)
    real = attention_mask.bool()
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    targets = positions[:, :-1]
    return Packing(
        input_ids=input_ids[real].unsqueeze(0),
        position_ids=positions[real].unsqueeze(0),
        target_index=starts.unsqueeze(1) + targets,
        target_valid=targets < (lengths - 1).unsqueeze(1),
    )


def token_budget_rows(lengths: Tensor, max_tokens: int) -> list[Tensor]:
    """Row indices of micro-batches of at most ``max_tokens`` tokens each (first-fit decreasing by length).

    A sequence longer than the budget gets a micro-batch of its own (it cannot be split). Which rows share a
    micro-batch cannot change the step's loss: every term is divided by the step's global counts.
    """
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    bins: list[list[int]] = []
    room: list[int] = []
    for row in order:
        size = int(lengths[row])
        for i, left in enumerate(room):
            if size <= left:
                bins[i].append(row)
                room[i] -= size
                break
        else:
            bins.append([row])
            room.append(max_tokens - size)
    return [torch.tensor(rows, dtype=torch.long) for rows in bins]
