"""The attention backend a model runs with: the one piece that differs between generating and training.

A decoder layer projects q, k and v and hands them, with the positions and its rotary tables and head norms, to
the backend, which returns the attention output. What happens in between belongs to the backend's owner:

- the engine's ``PagedAttention`` (``sluice.engine.model_ops``) norms and rotates q and k, writes k and v into
  its paged KV cache and attends over the cached sequence (a fused Triton kernel on GPU);
- the trainer's ``PackedCausalAttention`` (``packed_attention.py``) norms and rotates q and k and attends
  causally within each packed sequence, differentiably.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from sluice.models.layers import RMSNorm


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                 q_norm: RMSNorm | None, k_norm: RMSNorm | None, scale: float) -> Tensor:
        """Layer ``layer``'s q ``[T, Hq, D]``, k and v ``[T, Hkv, D]`` (before head norm and rotary), token
        positions ``[T]``, the model's cos/sin tables ``[max_positions, D / 2]`` and the optional per-head norms
        (Qwen3) -> the attention output ``[T, Hq, D]``."""
        ...
