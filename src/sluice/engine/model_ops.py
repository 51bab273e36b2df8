"""The ops the engine runs its decoder with: the model's elementwise ops, plus the K/V write of paged attention.

``rotary_store`` (q/k head norm, rotary, K/V cache write of one layer) belongs to the engine, not the model: it
writes the paged cache (``attention.store_kv``). On GPU it is a hand-written Triton kernel
(``attention/rotary_store_kernel.py``), one launch a layer where the compiled ops take up to six; the eager
composition below is its reference and its fallback. ``decoder_ops`` picks the set for a device; the engine
hands it to the model (``DecoderLM.ops``) as it hands it the attention function.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from sluice.engine.attention import store_kv
from sluice.models.fused import DecoderOps, add_rms_norm, rms_norm, rotary, silu_and_mul
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


EAGER_OPS = DecoderOps(rms_norm, add_rms_norm, silu_and_mul, rotary_store)


def decoder_ops(device: torch.device) -> DecoderOps:
    """Compiled ops on CUDA (dynamic in the token count: one compile serves every batch size) and the Triton
    ``rotary_store``, which falls back to the compiled norm and rotary where it does not apply (head dim not a
    power of two, mixed dtypes); eager elsewhere."""
    if device.type != "cuda":
        return EAGER_OPS
    from sluice.engine.attention import rotary_store_kernel  # Triton: imported only where it runs

    def compiled(fn):
        # Not fullgraph: past dynamo's recompile limit (many engines of different dtypes or norm eps in one
        # process, as in tests) a function falls back to eager instead of failing.
        return torch.compile(fn, dynamic=True)

    compiled_norm = compiled(rms_norm)
    unfused = functools.partial(rotary_store, norm=compiled_norm, rotate=compiled(rotary))
    fused_rotary_store = functools.partial(rotary_store_kernel.rotary_store, fallback=unfused)
    return DecoderOps(compiled_norm, compiled(add_rms_norm), compiled(silu_and_mul), fused_rotary_store)
