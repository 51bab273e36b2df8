"""Fixtures shared by tests/unit, tests/integration and tests/gpu; plain helpers are in tests/helpers/."""

from __future__ import annotations

import json

import pytest

from helpers.checkpoints import SMALL_SHAPE_KWARGS, build_lively_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real tiny Hugging Face checkpoint (character tokenizer, Qwen chat template), built once per session."""
    from sluice.demo.model import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="session")
def small_shape():
    from sluice.demo.model import TinyModelShape

    return TinyModelShape(**SMALL_SHAPE_KWARGS)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_shape) -> str:
    """A real tiny checkpoint (hidden 32, 2 layers, 2 heads / 1 kv head), seed 0, built once per session."""
    from sluice.demo.model import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("small_ckpt"), shape=small_shape, seed=0))


@pytest.fixture(scope="session")
def lively_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_shape) -> str:
    """Small shape, weights with std 0.3 (seed 0): outputs depend on the whole prompt."""
    return build_lively_checkpoint(tmp_path_factory.mktemp("lively_ckpt"), small_shape, seed=0)


@pytest.fixture(scope="session")
def lively_checkpoint_other(tmp_path_factory: pytest.TempPathFactory, small_shape) -> str:
    """Same shape as ``lively_checkpoint``, different weights (seed 1): a stand-in for trained weights."""
    return build_lively_checkpoint(tmp_path_factory.mktemp("lively_ckpt_other"), small_shape, seed=1)


@pytest.fixture(scope="module")
def engine(lively_checkpoint):
    """An in-process engine (CPU, float32) on the lively checkpoint, shared by a test module."""
    from sluice.config import EngineConfig
    from sluice.engine.local_engine import LocalEngine

    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def engine_other(lively_checkpoint_other):
    """An in-process engine on ``lively_checkpoint_other``: greedy outputs differ from ``engine``'s."""
    from sluice.engine.local_engine import LocalEngine

    from helpers.servers import CPU

    engine = LocalEngine(lively_checkpoint_other, CPU)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def say7(tmp_path_factory):
    """The "say 7" task (helpers/train_loop.py): (root directory, model built at SHAPE with seed 0, prompt file)."""
    from sluice.demo.model import build_checkpoint

    from helpers.train_loop import SHAPE

    root = tmp_path_factory.mktemp("estimators")
    data = root / "say7.jsonl"
    data.write_text("".join(json.dumps({"input": f"{c}: say 7", "label": "7"}) + "\n" for c in "abcdefghijkl"))
    return root, build_checkpoint(root / "model", shape=SHAPE, seed=0), data


@pytest.fixture(scope="module")
def say7_sft(say7):
    """SFT from data on the "say 7" task: (model, SFT file, eval set). The SFT file answers the first 8 prompts
    ("7" under answer.text, no label); the eval set is ``say7``'s prompt file, all 12 prompts with their labels."""
    root, model, prompts = say7
    rows = root / "say7_sft.jsonl"
    rows.write_text("".join(json.dumps({"input": f"{c}: say 7", "answer": {"text": "7"}}) + "\n" for c in "abcdefgh"))
    return model, rows, prompts
