"""The decoder's small elementwise ops, fused into one kernel each on GPU by ``torch.compile``.

A decode step of a small model is bound by the number of kernels, not by bytes: HF-style RMSNorm alone is six
kernels, rotary another eight. Compiled, each function below is one Triton kernel (inductor), and a decode step
goes from ~25 to ~10 kernels a layer. ``rotary_store`` (q/k head norm, rotary, K/V cache write) is instead a
hand-written Triton kernel on GPU (``rotary_store_kernel``), one launch a layer where the compiled ops take up
to six. On CPU the same functions run eagerly (no compiler needed, no warm-up), so tests there pin the numerics
the GPU path fuses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from sluice.engine.attention import store_kv
from sluice.engine.model.layers import RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 statistics, cast back before the weight: the order HF uses (bf16 parity with the trainer)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual): the residual add of one sublayer and the next sublayer's norm."""
    hidden = residual + x
    return rms_norm(hidden, weight, eps), hidden


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up on the fused [.., 2 * intermediate] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor):
    """Rotate q [T, Hq, D] and k [T, Hk, D] in the rotate-half layout at the given positions.

    HF applies rope in the activation dtype with cos/sin cast to it; doing the same keeps bf16 parity.
    """
    cos = cos_table[positions][:, None, :].to(q.dtype)
    sin = sin_table[positions][:, None, :].to(q.dtype)
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    return _rotate_half(q, cos, sin), _rotate_half(k, cos, sin)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


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
class DecoderOps:
    rms_norm: Callable
    add_rms_norm: Callable
    silu_and_mul: Callable
    rotary_store: Callable  # signature of ``rotary_store`` above


EAGER_OPS = DecoderOps(rms_norm, add_rms_norm, silu_and_mul, rotary_store)


def decoder_ops(device: torch.device) -> DecoderOps:
    """Compiled ops on CUDA (dynamic in the token count: one compile serves every batch size) and the Triton
    ``rotary_store``, which falls back to the compiled norm and rotary where it does not apply (head dim not a
    power of two, mixed dtypes); eager elsewhere."""
    if device.type != "cuda":
        return EAGER_OPS
    from sluice.engine.model import rotary_store_kernel  # Triton: imported only where it runs

    def compiled(fn):
        # Not fullgraph: past dynamo's recompile limit (many engines of different dtypes or norm eps in one
        # process, as in tests) a function falls back to eager instead of failing.
        return torch.compile(fn, dynamic=True)

    compiled_norm = compiled(rms_norm)
    unfused = functools.partial(rotary_store, norm=compiled_norm, rotate=compiled(rotary))
    fused_rotary_store = functools.partial(rotary_store_kernel.rotary_store, fallback=unfused)
    return DecoderOps(compiled_norm, compiled(add_rms_norm), compiled(silu_and_mul), fused_rotary_store)
