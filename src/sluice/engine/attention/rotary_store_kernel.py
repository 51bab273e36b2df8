"""q/k head norm (Qwen3), rotary and the paged K/V cache write of one layer, as one Triton kernel (GPU path).

Unfused, a decode step runs up to six tiny kernels a layer for this (two q/k norms, two rotaries, two
``index_copy``), each bound by launch latency, not bytes. Here one program per token loads its position, slot
and cos/sin row once; rotates its ``Hq`` query heads into a new ``[T, Hq, D]`` tensor; rotates its ``Hk`` key
heads into the K cache and copies its value heads into the V cache, at ``slot_mapping`` in the layout of
``store_kv`` (this package). The inputs may be strided views of the fused QKV projection.

Numerics: the same roundings as the eager ops (``sluice.models.fused``, composed in
``sluice.engine.model_ops.rotary_store``), which follow HF. cos/sin are rounded to the
activation dtype; each product and the sum are computed in fp32 and rounded to the activation dtype, which is
what PyTorch eager does for bf16 (a product of two bf16 values is exact in fp32, and fp32 has enough extra bits
that rounding the fp32 sum again gives the correctly rounded bf16 sum). fp32 launches turn off FMA contraction,
which would round ``a * b + c`` once instead of twice. So rotary is bit-for-bit the eager result. The one
exception is the head norm: its sum of squares is reduced in a different order than PyTorch's, so a normed
value can differ by a few fp32 ulps; in bf16 rarely by one ulp (two, at worst, once times the weight).

Padding rows of a CUDA-graph batch (position 0, slot 0 of scratch page 0) all write slot 0: which row wins is
unspecified, and no sequence reads that page.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from sluice.models.layers import RMSNorm

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    fallback: Callable,
) -> torch.Tensor:
    """The contract of ``model_ops.rotary_store``, in one kernel; ``fallback`` (same signature) runs what the
    kernel does not cover (see ``supports``). Reads no device values on the host: CUDA-graph capturable."""
    if not supports(q, k, v, cos_table, sin_table, q_norm, k_norm, k_cache, v_cache, positions, slot_mapping):
        return fallback(q, k, v, positions, cos_table, sin_table, q_norm, k_norm, k_cache, v_cache, slot_mapping)
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    out = torch.empty((tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)
    has_norm = q_norm is not None
    # Without a norm the weights and eps are never read; any tensor of the right dtype stands in.
    q_weight, k_weight = (q_norm.weight, k_norm.weight) if has_norm else (q, q)
    q_eps, k_eps = (q_norm.eps, k_norm.eps) if has_norm else (0.0, 0.0)
    block_q, block_kv = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(num_kv_heads)
    _rotary_store_kernel[(tokens,)](
        q, k, v, out, k_slots, v_slots, positions, slot_mapping, cos_table, sin_table,
        q_weight, k_weight, q_eps, k_eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        k_slots.stride(0), k_slots.stride(1), cos_table.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, BLOCK_Q=block_q, BLOCK_KV=block_kv,
        HALF=head_dim // 2, QK_NORM=has_norm,
        num_warps=_num_warps((block_q + 2 * block_kv) * head_dim),
        enable_fp_fusion=False,  # no FMA: fp32 products round before the add, as in eager
    )
    return out


def supports(q, k, v, cos_table, sin_table, q_norm, k_norm, k_cache, v_cache, positions, slot_mapping) -> bool:
    """Head dim a power of two >= 4 (tiles of ``tl.arange``); one float dtype for activations, caches and norm
    weights; contiguous last dims, caches and index vectors; a float32 cos/sin row per half head dim (full
    rotary); caches shaped for the key heads. Shapes, dtypes and strides only: no device value is read."""
    head_dim = q.shape[-1]
    dtype = q.dtype
    same_dtype = dtype in _DTYPES and all(t.dtype == dtype for t in (k, v, k_cache, v_cache))
    if q_norm is not None:
        same_dtype = same_dtype and all(w.dtype == dtype and w.is_contiguous() for w in (q_norm.weight, k_norm.weight))
    return (
        head_dim >= 4 and head_dim & (head_dim - 1) == 0
        and same_dtype
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and k.shape == v.shape and k_cache.shape == v_cache.shape and k_cache.shape[-2:] == k.shape[-2:]
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and cos_table.shape[-1] == head_dim // 2 and cos_table.stride() == sin_table.stride()
        and cos_table.stride(-1) == 1 and cos_table.dtype == sin_table.dtype == torch.float32
        and positions.is_contiguous() and slot_mapping.is_contiguous()
    )


def _num_warps(elements: int) -> int:
    """Starting points, not yet timed: a program touches (Hq + 2 Hk) x D elements."""
    return 2 if elements <= 2048 else 4 if elements <= 8192 else 8


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, slot_mapping_ptr, cos_ptr, sin_ptr,
    q_weight_ptr, k_weight_ptr, q_eps, k_eps,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, out_stride_t, out_stride_h,
    cache_stride_slot, cache_stride_h, table_stride,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    HALF: tl.constexpr, QK_NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token)
    slot = tl.load(slot_mapping_ptr + token)
    dtype = q_out_ptr.dtype.element_ty
    cols = tl.arange(0, HALF)
    # HF rounds cos/sin to the activation dtype before multiplying.
    cos = tl.load(cos_ptr + position * table_stride + cols).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + position * table_stride + cols).to(dtype).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * q_stride_t, q_stride_h, q_out_ptr + token * out_stride_t, out_stride_h,
                  q_weight_ptr, q_eps, cos, sin, NUM_Q_HEADS, BLOCK_Q, HALF, QK_NORM)
    _rotate_heads(k_ptr + token * k_stride_t, k_stride_h, k_cache_ptr + slot * cache_stride_slot, cache_stride_h,
                  k_weight_ptr, k_eps, cos, sin, NUM_KV_HEADS, BLOCK_KV, HALF, QK_NORM)
    heads = tl.arange(0, BLOCK_KV)[:, None]
    dims = tl.arange(0, 2 * HALF)[None, :]
    mask = heads < NUM_KV_HEADS
    value = tl.load(v_ptr + token * v_stride_t + heads * v_stride_h + dims, mask=mask)
    tl.store(v_cache_ptr + slot * cache_stride_slot + heads * cache_stride_h + dims, value, mask=mask)


@triton.jit
def _rotate_heads(src, src_stride_h, dst, dst_stride_h, weight_ptr, eps, cos, sin,
                  NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr):
    """Rotate-half on ``NUM_HEADS`` rows of one token: out = x * cos + cat(-x2, x1) * sin, each half apart."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < NUM_HEADS
    dtype = dst.dtype.element_ty
    x1 = tl.load(src + heads * src_stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + heads * src_stride_h + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        # fused.rms_norm: fp32 statistics, rounded to the activation dtype, then times the weight (rounded).
        rstd = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(weight_ptr + cols).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + cols).to(tl.float32)
        x1 = _round(w1 * _round(x1 * rstd, dtype), dtype)
        x2 = _round(w2 * _round(x2 * rstd, dtype), dtype)
    # (-x2) * sin rounds to -(x2 * sin): the first half's add of a negated product is this subtraction.
    out1 = _round(x1 * cos, dtype) - _round(x2 * sin, dtype)
    out2 = _round(x2 * cos, dtype) + _round(x1 * sin, dtype)
    tl.store(dst + heads * dst_stride_h + cols, out1.to(dtype), mask=mask)
    tl.store(dst + heads * dst_stride_h + HALF + cols, out2.to(dtype), mask=mask)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """Round an fp32 value to ``dtype`` and back: what one eager op in ``dtype`` stores."""
    return x.to(dtype).to(tl.float32)
