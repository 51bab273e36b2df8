"""Dense decoder-only LM for the Qwen2/Qwen2.5, Qwen3 and Llama families, written for the paged KV cache.

The three families differ in three switches read from the HF config: bias on the QKV projection (Qwen2),
per-head RMSNorm on q and k before rotary (Qwen3), and the rope scaling type (Llama-3). Q, K and V share one
fused projection and gate/up another, so a layer runs two matmuls where HF runs five.

A forward takes the step's tokens of all sequences packed flat (``[T]``) with their positions and the attention
backend's metadata (the engine's ``AttentionMetadata``), which the model only hands on to ``attend`` and
``ops.rotary_store`` (the backend and the ops are passed in: the model knows no KV pool or scheduler); it
returns hidden states ``[T, hidden]``. Logits are computed by the caller only for
the rows it samples from (``compute_logits``), which saves the vocab projection for every prefill token.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from sluice.models.fused import DecoderOps
from sluice.models.layers import RMSNorm, RotaryEmbedding

# attend(q, k_cache, v_cache, meta, scale) -> output: the attention backend, passed in with its metadata ``meta``
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, float], torch.Tensor]


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, qk_norm: bool, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, hidden, positions, rotary, meta, k_cache, v_cache, attend: AttentionFn, ops: DecoderOps):
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q = ops.rotary_store(q, k, v, positions, rotary.cos, rotary.sin, self.q_norm, self.k_norm, k_cache, v_cache,
                             meta.slot_mapping)
        out = attend(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor, ops: DecoderOps) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(hidden)))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, qk_norm: bool, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, residual, positions, rotary, meta, k_cache, v_cache, attend, ops: DecoderOps):
        """(sublayer output, residual stream): the residual add is fused into the next norm."""
        norm = self.input_layernorm
        if residual is None:
            residual, hidden = hidden, ops.rms_norm(hidden, norm.weight, norm.eps)
        else:
            hidden, residual = ops.add_rms_norm(hidden, residual, norm.weight, norm.eps)
        hidden = self.self_attn(hidden, positions, rotary, meta, k_cache, v_cache, attend, ops)
        norm = self.post_attention_layernorm
        hidden, residual = ops.add_rms_norm(hidden, residual, norm.weight, norm.eps)
        return self.mlp(hidden, ops), residual


class DecoderLM(nn.Module):
    """The whole model; parameter names are HF's except the fused ``qkv_proj`` and ``gate_up_proj``."""

    def __init__(self, config: PretrainedConfig, *, qk_norm: bool, qkv_bias: bool, o_bias: bool, max_positions: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, qk_norm, qkv_bias, o_bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.ops: DecoderOps | None = None  # set by whoever runs the model (the engine: model_ops.decoder_ops)

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attend: AttentionFn,
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, positions, self.rotary, meta, k_cache, v_cache, attend, self.ops)
        return self.ops.add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.matmul(hidden, weight.t(), out=out)
