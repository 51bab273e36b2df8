"""The ops the engine runs its decoder with: the model's elementwise ops, plus the K/V write of paged attention.

``rotary_store`` (q/k head norm, rotary, K/V cache write of one layer) belongs to the engine, not the model: it
writes the paged cache (``attention.store_kv``). On GPU it is a hand-written Triton kernel
(``attention/rotary_store_kernel.py``), one launch a layer where the compiled ops take up to six; the eager
composition below is its reference and its fallback. ``engine_ops`` picks the set for a device: the model's
elementwise ops go to the model (``DecoderLM.ops``), ``rotary_store`` into each step's ``PagedAttention``, the
attention backend the model is called with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sluice.engine.attention import store_kv
from sluice.models.fused import EAGER_OPS as EAGER_DECODER_OPS, DecoderOps, compile_op, decoder_ops, rms_norm, rotary
from sluice.models.layers import RMSNorm


def rotary_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    q_norm: RMSNorm | None,
    k_norm: RMSNorm | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    norm: Callable = rms_norm,
    rotate: Callable = rotary,
) -> torch.Tensor:
    """One layer's q [T, Hq, D], k and v [T, Hk, D] (views of the QKV projection) -> rotated q; the rotated k
    and v are written to the cache at ``slot_mapping``. The per-head norms (Qwen3; None for models without)
    come before rotary. ``norm``/``rotate`` are the implementations to compose (compiled ones on GPU)."""
    if q_norm is not None:
        q = norm(q, q_norm.weight, q_norm.eps)
        k = norm(k, k_norm.weight, k_norm.eps)
    q, k = rotate(positions, q, k, cos_table, sin_table)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


@dataclass(frozen=True)
class PagedAttention:
    """The engine's attention backend (``sluice.models.attention``) for one step: head norm and rotary, the K/V
    write into each layer's paged cache, then ``attend`` over the cached sequences. Built per step (or once per
    captured CUDA graph, whose metadata tensors are static)."""

    meta: Any  # the step's AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)
    attend: Callable  # attend(q, k_cache, v_cache, meta, scale) -> [T, Hq, D]
    rotary_store: Callable  # signature of ``rotary_store`` above

    def __call__(self, layer, q, k, v, positions, cos, sin, q_norm, k_norm, scale):
        k_cache, v_cache = self.kv_caches[layer]
        q = self.rotary_store(q, k, v, positions, cos, sin, q_norm, k_norm, k_cache, v_cache, self.meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, self.meta, scale)


@dataclass(frozen=True)
class EngineOps:
    """What the engine runs its model with: the model's elementwise ops and its own K/V-writing ``rotary_store``."""

    decoder: DecoderOps
    rotary_store: Callable


EAGER_OPS = EngineOps(EAGER_DECODER_OPS, rotary_store)


def engine_ops(device: torch.device) -> EngineOps:
    """Compiled ops on CUDA and the Triton ``rotary_store``, which falls back to the compiled norm and rotary where
    it does not apply (head dim not a power of two, mixed dtypes); eager elsewhere."""
    if device.type != "cuda":
        return EAGER_OPS
    from sluice.engine.attention import rotary_store_kernel  # Triton: imported only where it runs

    decoder = decoder_ops(device)
    unfused = functools.partial(rotary_store, norm=decoder.rms_norm, rotate=compile_op(rotary))
    return EngineOps(decoder, functools.partial(rotary_store_kernel.rotary_store, fallback=unfused))

