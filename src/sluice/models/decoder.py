"""Dense decoder-only LM for the Qwen2/Qwen2.5, Qwen3 and Llama families: one definition for the engine and the
trainer.

The three families differ in three switches read from the HF config: bias on the QKV projection (Qwen2),
per-head RMSNorm on q and k before rotary (Qwen3), and the rope scaling type (Llama-3). Q, K and V share one
fused projection and gate/up another, so a layer runs two matmuls where HF runs five.

A forward takes tokens of all sequences packed flat (``[T]``), their positions and an attention backend
(``models/attention.py``); it returns hidden states ``[T, hidden]``. The backend owns what differs between uses:
the engine's writes K/V into its paged cache and attends over it, the trainer's attends within each packed
sequence (``packed_attention.py``). The model knows no KV pool, scheduler, optimizer or loss. Logits are computed
by the caller only for the rows it needs (``compute_logits``, or the trainer's chunked LM head).

Training: ``recompute`` checkpoints activations (Megatron's full/selective granularity, ``RecomputePlan``).
Whatever the plan, the MLP keeps only its gate/up projection for the backward pass (``SwiGLUDown``): the SwiGLU
output that the down projection reads is recomputed there, elementwise, instead of being stored.
Under ``torch.autocast`` the embedding output is cast to the autocast dtype, so the residual stream and every
activation run in that dtype while the parameters stay float32 (master weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig

from sluice.models.attention import AttentionBackend
from sluice.models.fused import EAGER_OPS, DecoderOps
from sluice.models.layers import RMSNorm, RotaryEmbedding


@dataclass(frozen=True)
class RecomputePlan:
    """Which activations the backward pass recomputes (Megatron's --recompute-* flags)."""

    granularity: str  # "full": whole decoder layers; "selective": the core attention only
    method: str = "uniform"  # full only: "uniform" groups of ``num_layers`` layers, or "block": the first layers
    num_layers: int = 1

    def segments(self, num_layers: int) -> list[tuple[int, int, bool]]:
        """(first layer, end layer, checkpointed) runs covering every layer in order."""
        if self.granularity != "full":
            return [(0, num_layers, False)]
        if self.method == "block":
            count = min(self.num_layers, num_layers)
            return [(i, i + 1, True) for i in range(count)] + ([(count, num_layers, False)] if count < num_layers else [])
        return [(i, min(i + self.num_layers, num_layers), True) for i in range(0, num_layers, self.num_layers)]


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, qk_norm: bool, qkv_bias: bool, o_bias: bool, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
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

    def forward(self, hidden, positions, rotary: RotaryEmbedding, attention: AttentionBackend,
                recompute_core: bool = False):
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        args = (self.layer_index, q, k, v, positions, rotary.cos, rotary.sin, self.q_norm, self.k_norm, self.scale)
        out = checkpoint(attention, *args, use_reentrant=False) if recompute_core else attention(*args)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor, ops: DecoderOps) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden)
        if not (torch.is_grad_enabled() and gate_up.requires_grad):  # the engine, no-grad logprob passes
            return self.down_proj(ops.silu_and_mul(gate_up))
        weight, bias = self.down_proj.weight, self.down_proj.bias  # float32 masters under autocast: cast here
        return SwiGLUDown.apply(gate_up, weight.to(gate_up.dtype), None if bias is None else bias.to(gate_up.dtype),
                                ops)


class SwiGLUDown(torch.autograd.Function):
    """``down_proj(silu(gate) * up)`` that keeps ``gate_up`` (and the weight) for the backward pass, not the
    SwiGLU output the plain composition stores as the down projection's input: one ``[T, intermediate]`` tensor
    less per layer (about a sixth of a dense layer's activations), for one elementwise op in the backward."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ops: DecoderOps):
        ctx.save_for_backward(gate_up, weight)
        ctx.ops, ctx.has_bias = ops, bias is not None
        return torch.nn.functional.linear(ops.silu_and_mul(gate_up), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate_up, weight = ctx.saved_tensors
        needs_gate_up, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(weight.dtype)
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_bias = grad_gate_up = None
        if needs_weight:
            act = ctx.ops.silu_and_mul(gate_up)
            grad_weight = flat.t() @ act.reshape(-1, act.shape[-1])
        if needs_bias and ctx.has_bias:
            grad_bias = flat.sum(0)
        if needs_gate_up:
            grad_gate_up = ctx.ops.silu_and_mul_backward(gate_up, grad_out @ weight)
        return grad_gate_up, grad_weight, grad_bias, None


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, qk_norm: bool, qkv_bias: bool, o_bias: bool, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm, qkv_bias, o_bias, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, residual, positions, rotary, attention: AttentionBackend, ops: DecoderOps,
                recompute_core: bool = False):
        """(sublayer output, residual stream): the residual add is fused into the next norm."""
        norm = self.input_layernorm
        if residual is None:
            residual, hidden = hidden, ops.rms_norm(hidden, norm.weight, norm.eps)
        else:
            hidden, residual = ops.add_rms_norm(hidden, residual, norm.weight, norm.eps)
        hidden = self.self_attn(hidden, positions, rotary, attention, recompute_core)
        norm = self.post_attention_layernorm
        hidden, residual = ops.add_rms_norm(hidden, residual, norm.weight, norm.eps)
        return self.mlp(hidden, ops), residual


class DecoderLM(nn.Module):
    """The whole model; parameter names are HF's except the fused ``qkv_proj`` and ``gate_up_proj`` (and no
    ``model.`` prefix): ``hf_layout.py`` converts whole state dicts."""

    _no_split_modules = ["DecoderLayer"]  # the unit FSDP shards (trainer/data_parallel.py)

    def __init__(self, config: PretrainedConfig, *, qk_norm: bool, qkv_bias: bool, o_bias: bool, max_positions: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, qk_norm, qkv_bias, o_bias, index)
                                    for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.ops: DecoderOps = EAGER_OPS  # the runner swaps in compiled ops on GPU (engine: model_ops; trainer)

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                recompute: RecomputePlan | None = None, head: Callable | None = None):
        """Hidden states ``[T, hidden]`` after the final norm, for tokens ``[T]`` at ``positions [T]``; with
        ``head``, ``head(hidden, lm_head_weight)`` instead (the trainer's chunked LM head: inside the forward, so
        a sharded model has its head weight gathered)."""
        hidden = self.embed_tokens(input_ids)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # float32 master weights: activations in the compute dtype
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        residual = None
        recompute_core = recompute is not None and recompute.granularity == "selective"
        segments = [(0, len(self.layers), False)] if recompute is None else recompute.segments(len(self.layers))
        for first, end, checkpointed in segments:
            args = (first, end, hidden, residual, positions, attention, recompute_core)
            hidden, residual = checkpoint(self._run_layers, *args, use_reentrant=False) if checkpointed \
                else self._run_layers(*args)
        hidden = self.ops.add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps)[0]
        return hidden if head is None else head(hidden, self.lm_head_weight)

    def _run_layers(self, first, end, hidden, residual, positions, attention, recompute_core):
        for index in range(first, end):  # indexing, not a slice: slicing builds a new ModuleList each call
            hidden, residual = self.layers[index](hidden, residual, positions, self.rotary, attention, self.ops, recompute_core)
        return hidden, residual

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[vocab, hidden]``: the output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.matmul(hidden, self.lm_head_weight.t(), out=out)
