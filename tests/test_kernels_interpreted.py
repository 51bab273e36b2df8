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

HERE = Path(__file__).parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernel modules run directly")
@pytest.mark.parametrize("module", ["test_rotary_store_kernel.py", "test_triton_attention.py"])
def test_kernel_module_in_interpreter(module):
    pytest.importorskip("triton")
    env = {**os.environ, "SLUICE_TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / module)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
