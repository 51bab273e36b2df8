"""Tiny random checkpoints of each supported architecture (large weights: outputs depend on the whole context),
and prompts of token ids for them."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from sluice.demo.tokenizer import save_tokenizer

COMMON = dict(vocab_size=102, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, pad_token_id=0)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
    "llama3": lambda: LlamaConfig(**COMMON, attention_bias=True, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def build_arch_checkpoint(out_dir, name: str, seed: int = 0) -> str:
    config = CONFIGS[name]()
    config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # large weights: every output token depends on the whole context
        for param in model.parameters():
            param.copy_(torch.randn(param.shape) * (0.3 if param.dim() >= 2 else 1.0))
    model.save_pretrained(out_dir)
    save_tokenizer(out_dir)
    return str(out_dir)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26], [30] * 21]


def megatron_model_args(hf: dict) -> list[str]:
    """slime's scripts/models/qwen3-*.sh MODEL_ARGS with a checkpoint's sizes (config.json as a dict)."""
    rope = hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]
    return [
        "--swiglu", "--num-layers", str(hf["num_hidden_layers"]), "--hidden-size", str(hf["hidden_size"]),
        "--ffn-hidden-size", str(hf["intermediate_size"]), "--num-attention-heads", str(hf["num_attention_heads"]),
        "--group-query-attention", "--num-query-groups", str(hf["num_key_value_heads"]),
        "--use-rotary-position-embeddings", "--disable-bias-linear", "--normalization", "RMSNorm",
        "--norm-epsilon", str(hf["rms_norm_eps"]), "--rotary-base", str(int(rope)), "--vocab-size",
        str(hf["vocab_size"]), "--kv-channels", str(hf["head_dim"]), "--qk-layernorm",
    ] + ([] if hf.get("tie_word_embeddings", True) else ["--untie-embeddings-and-output-weights"])
