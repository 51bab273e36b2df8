"""Reading HF safetensors checkpoint directories: tensor names and shapes from the headers, and the tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


def _safetensors_files(directory: str | Path) -> list[Path]:
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    return files


def safetensors_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a checkpoint's tensors, read from the headers only."""
    shapes = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def iter_safetensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every *.safetensors file of an HF checkpoint directory."""
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
