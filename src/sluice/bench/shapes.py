"""Model shapes the benchmarks run, as HF configs, and random-weight checkpoints of them written on the fly."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, Qwen2Config, Qwen3Config

_QWEN_VOCAB = 151936


def _qwen2_5_0_5b() -> PretrainedConfig:
    return Qwen2Config(vocab_size=_QWEN_VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _qwen2_5_1_5b() -> PretrainedConfig:
    return Qwen2Config(vocab_size=_QWEN_VOCAB, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _qwen2_5_7b() -> PretrainedConfig:
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _qwen3_0_6b() -> PretrainedConfig:
    return Qwen3Config(vocab_size=_QWEN_VOCAB, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _tiny() -> PretrainedConfig:
    """For trying the benchmark on a CPU."""
    return Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)


SHAPES = {"qwen2.5-0.5b": _qwen2_5_0_5b, "qwen2.5-1.5b": _qwen2_5_1_5b, "qwen2.5-7b": _qwen2_5_7b,
          "qwen3-0.6b": _qwen3_0_6b, "tiny": _tiny}


def shape_config(name: str) -> PretrainedConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    config = SHAPES[name]()
    config.architectures = ["Qwen3ForCausalLM" if isinstance(config, Qwen3Config) else "Qwen2ForCausalLM"]
    config.eos_token_id = 0
    return config


def write_random_checkpoint(name: str, out_dir: str | Path, dtype: torch.dtype, device: str, seed: int = 0) -> Path:
    """An HF checkpoint (config + safetensors, no tokenizer) with N(0, 0.02) weights, as HF initialises them."""
    out = Path(out_dir)
    config = shape_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    return out


def parameter_bytes(config: PretrainedConfig, bytes_per_param: int) -> int:
    """Bytes of the weights a decode step reads (embeddings are gathered, not read, unless tied to the head)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    return (config.num_hidden_layers * per_layer + config.vocab_size * hidden) * bytes_per_param
