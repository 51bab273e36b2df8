"""The GPU kernels' tests on a machine without CUDA: each module runs in a fresh process through Triton's
interpreter (SLUICE_TRITON_INTERPRET=1; Triton reads TRITON_INTERPRET when the kernels are decorated), so CPU CI
checks the kernels' logic too. On a GPU machine those modules run directly and this one has nothing to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernel modules run directly")
@pytest.mark.parametrize("module", ["test_rotary_store_kernel.py", "test_triton_attention.py"])
def test_kernel_module_in_interpreter(module):
    pytest.importorskip("triton")
    env = {**os.environ, "SLUICE_TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "gpu" / module)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


WARM_UP = """
import sys, tempfile
sys.path.insert(0, {tests!r})
from helpers.checkpoints import SMALL_SHAPE_KWARGS, build_lively_checkpoint
from sluice.config import EngineConfig
from sluice.demo.model import TinyModelShape
from sluice.engine.local_engine import LocalEngine
checkpoint = build_lively_checkpoint(tempfile.mkdtemp(), TinyModelShape(**SMALL_SHAPE_KWARGS), seed=0)
engine = LocalEngine(checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=4, context_length=32))
engine.runner.warm_up()
engine.shutdown()
print("warmed")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA every engine start runs it")
def test_the_engine_warm_up_runs_in_the_interpreter():
    """ModelRunner.warm_up (the GPU start-up's compile pass) on CPU tensors: synthetic prefill, eager decode and
    the sampling kernel at every work split, with a context shorter than its synthetic prompts."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", WARM_UP.format(tests=str(TESTS))], env=env, capture_output=True,
                            text=True, timeout=300, cwd=TESTS.parent)
    assert result.returncode == 0 and "warmed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
