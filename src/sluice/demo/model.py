"""A tiny Qwen2-architecture checkpoint in Hugging Face format, built deterministically from a seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sluice.demo.tokenizer import EOS_TOKEN, PAD_TOKEN, build_tokenizer, save_tokenizer


@dataclass(frozen=True)
class TinyModelShape:
    """Sizes of the demo model; the defaults give ~0.8M parameters, a few ms per decode step on a CPU."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


def build_checkpoint(out_dir: str | Path, shape: TinyModelShape = TinyModelShape(), seed: int = 0,
                     with_tools: bool = False) -> Path:
    """Write config.json, model.safetensors and the tokenizer files to ``out_dir``; same seed, same bytes.

    ``with_tools``: a tokenizer with tool markup tokens and a tool-calling chat template (demo/tokenizer.py).
    """
    out = Path(out_dir)
    vocab_size = save_tokenizer(out, with_tools)
    tokenizer = build_tokenizer(with_tools)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        eos_token_id=tokenizer.token_to_id(EOS_TOKEN),
        pad_token_id=tokenizer.token_to_id(PAD_TOKEN),
        bos_token_id=None,
        torch_dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out, safe_serialization=True)
    return out
