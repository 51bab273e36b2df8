"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real tiny Hugging Face checkpoint (character tokenizer, Qwen chat template), built once per session."""
    from sluice.demo.model import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("ckpt")))
