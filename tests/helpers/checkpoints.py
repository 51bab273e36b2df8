"""Tiny checkpoints for tests: the small shape, and "lively" weights whose outputs depend on the whole prompt."""

from __future__ import annotations

# A smaller shape than the demo default, for tests that build engines and trainers many times.
SMALL_SHAPE_KWARGS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=512)


def build_lively_checkpoint(out_dir, shape, seed: int, std: float = 0.3) -> str:
    """A small checkpoint whose matrices are redrawn with a large std (seeded).

    At the default init (std 0.02) the tied embeddings dominate and greedy decoding just repeats the last
    prompt token, so left-padding or cache bugs could go unnoticed; with std 0.3 every output token depends
    on the whole context, and EOS shows up now and then.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from sluice.demo.model import build_checkpoint

    path = build_checkpoint(out_dir, shape=shape, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(path)
    return str(path)
