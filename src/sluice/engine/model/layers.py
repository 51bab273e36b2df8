"""Small building blocks of the dense decoder: RMSNorm, rotary embedding, the gated MLP activation."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, the order HF uses (bf16 parity)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to the context length, in float32, looked up by position id.

    The inverse frequencies come from transformers' rope functions (llama3, yarn, linear, dynamic...) so a
    checkpoint's ``rope_parameters`` mean here what they mean in transformers.
    """

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int):
        super().__init__()
        target = torch.get_default_device()
        with torch.device("cpu"):  # rope init functions mix explicit-CPU and default-device tensors
            cos, sin = _rope_tables(config, head_dim, max_positions)
        self.register_buffer("cos", cos.to(target), persistent=False)
        self.register_buffer("sin", sin.to(target), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hk, D] (rotate-half layout, as HF checkpoints expect)."""
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rope_tables(config: PretrainedConfig, head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        scaling = 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    else:
        raise ValueError(f"rope_type {rope_type!r} is not supported; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    # float32 products, as transformers computes them: the trainer's logprobs see the same angles.
    angles = torch.arange(max_positions).float()[:, None] * inv_freq.float()[None, :]
    return angles.cos() * scaling, angles.sin() * scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF applies rope in the activation dtype with cos/sin cast to it; doing the same keeps bf16 parity.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos_full = torch.cat([cos, cos], dim=-1)
    sin_full = torch.cat([sin, sin], dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos_full + rotated * sin_full


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up on the fused [.., 2 * intermediate] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
