"""FLOPs of training a dense decoder on packed sequences, and model FLOP utilisation (MFU).

Matrix products: every matmul weight does 2 FLOPs per token forward and 4 backward (the gradients of its input
and of its weight), so 6 * N * tokens, where N counts the matmul weights: the decoder's projections plus the LM
head (vocab x hidden, counted once even when tied to the embeddings; the embedding lookup is a gather, not a
matmul). Norms and biases are left out (elementwise, under 0.1% of the FLOPs).

Attention: per layer and sequence of length s, Q K^T and P V are two matmuls of 2 * s * s * q_size FLOPs each
(q_size = query heads x head dim); causality halves them (2 * s^2 * q_size), and backward costs twice the
forward, so a training pass costs 6 * L * q_size * s^2. Padding is never counted: only real tokens and the
attention among the tokens of one sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig

MFU_FORMULA = "(6*N*tokens + 6*L*q_size*sum(len_i^2)) / time / peak"
FORWARD_MFU_FORMULA = "(2*N*tokens + 2*L*q_size*sum(len_i^2)) / time / peak"


def _q_size(config: PretrainedConfig) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def matmul_parameters(config: PretrainedConfig) -> int:
    """N: weights of the decoder's matmuls (q, k, v, o, gate, up, down) plus the LM head."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q = _q_size(config)
    kv = config.num_key_value_heads * (q // config.num_attention_heads)
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    return config.num_hidden_layers * per_layer + config.vocab_size * hidden


def train_flops(config: PretrainedConfig, lengths: Sequence[int], backward: bool = True) -> int:
    """FLOPs of one pass over sequences of these lengths: forward + backward (x3), or forward only (x1)."""
    passes = 3 if backward else 1
    tokens = sum(lengths)
    attention = 2 * config.num_hidden_layers * _q_size(config) * sum(n * n for n in lengths)
    return passes * (2 * matmul_parameters(config) * tokens + attention)


def mfu(flops: int, seconds: float, peak_tflops: float | None) -> float | None:
    """Achieved FLOP/s over the device's peak; None without a peak (CPU)."""
    if peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)
