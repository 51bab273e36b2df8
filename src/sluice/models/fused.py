"""The decoder's small elementwise ops (norms, SwiGLU, rotary), and ``DecoderOps``, the set a model runs with.

A decode step of a small model is bound by the number of kernels, not by bytes: HF-style RMSNorm alone is six
kernels, rotary another eight. Whoever runs the model picks the implementations and hands them over as
``DecoderOps``: the engine compiles each function below into one Triton kernel on GPU (inductor) and adds the
K/V cache write of its paged attention (``sluice.engine.model_ops``); on CPU the same functions run eagerly (no
compiler needed, no warm-up), so tests there pin the numerics the GPU path fuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 statistics, cast back before the weight: the order HF uses (bf16 parity with the trainer)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * x32.to(x.dtype)  # float32 master weights meet bf16 activations in bf16


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual): the residual add of one sublayer and the next sublayer's norm."""
    hidden = residual + x
    return rms_norm(hidden, weight, eps), hidden


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up on the fused [.., 2 * intermediate] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_and_mul_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``silu_and_mul`` at ``gate_up`` for the output gradient ``grad``, in float32 at least and
    cast back: d/d gate = grad * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate); d/d up = grad * silu(gate)."""
    dtype = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(dtype).chunk(2, dim=-1)
    grad = grad.to(dtype)
    sig = torch.sigmoid(gate)
    d_gate = grad * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, grad * gate * sig], dim=-1).to(gate_up.dtype)


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


@dataclass(frozen=True)
class DecoderOps:
    rms_norm: Callable
    add_rms_norm: Callable
    silu_and_mul: Callable
    silu_and_mul_backward: Callable = silu_and_mul_backward  # training only (models/decoder.py: SwiGLUDown)



EAGER_OPS = DecoderOps(rms_norm, add_rms_norm, silu_and_mul, silu_and_mul_backward)


def compile_op(fn: Callable) -> Callable:
    """``fn`` as one inductor kernel, dynamic in the token count (one compile serves every batch size). Not
    fullgraph: past dynamo's recompile limit (many models of different dtypes or norm eps in one process, as in
    tests) a function falls back to eager instead of failing. Compiled functions keep their autograd."""
    return torch.compile(fn, dynamic=True)


def decoder_ops(device: torch.device) -> DecoderOps:
    """Compiled ops on CUDA, eager elsewhere (no compiler, no warm-up; the numerics the GPU path fuses)."""
    if device.type != "cuda":
        return EAGER_OPS
    return DecoderOps(compile_op(rms_norm), compile_op(add_rms_norm), compile_op(silu_and_mul),
                      compile_op(silu_and_mul_backward))
