"""Parameter holders of the dense decoder: RMSNorm weights and the rotary cos/sin tables (the math is in fused.py)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RMSNorm(nn.Module):
    """Holds the weight; the math is ``fused.rms_norm`` / ``fused.add_rms_norm``, picked by the model's ops."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps


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
