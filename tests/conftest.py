"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real tiny Hugging Face checkpoint (character tokenizer, Qwen chat template), built once per session."""
    from sluice.demo.model import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("ckpt")))


# A smaller shape than the demo default, for tests that build engines and trainers many times.
SMALL_SHAPE_KWARGS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=512)


@pytest.fixture(scope="session")
def small_shape():
    from sluice.demo.model import TinyModelShape

    return TinyModelShape(**SMALL_SHAPE_KWARGS)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_shape) -> str:
    """A real tiny checkpoint (hidden 32, 2 layers, 2 heads / 1 kv head), seed 0, built once per session."""
    from sluice.demo.model import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("small_ckpt"), shape=small_shape, seed=0))


def _build_lively(out_dir, shape, seed: int, std: float = 0.3) -> str:
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


@pytest.fixture(scope="session")
def lively_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_shape) -> str:
    """Small shape, weights with std 0.3 (seed 0): outputs depend on the whole prompt."""
    return _build_lively(tmp_path_factory.mktemp("lively_ckpt"), small_shape, seed=0)


@pytest.fixture(scope="session")
def lively_checkpoint_other(tmp_path_factory: pytest.TempPathFactory, small_shape) -> str:
    """Same shape as ``lively_checkpoint``, different weights (seed 1): a stand-in for trained weights."""
    return _build_lively(tmp_path_factory.mktemp("lively_ckpt_other"), small_shape, seed=1)


@pytest.fixture(scope="module")
def engine(lively_checkpoint):
    """An in-process engine (CPU, float32) on the lively checkpoint, shared by a test module."""
    from sluice.config import EngineConfig
    from sluice.engine.local_engine import LocalEngine

    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32"))
    yield engine
    engine.shutdown()
