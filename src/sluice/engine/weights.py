"""Loading weights into an engine model: HF safetensors directories and in-memory named tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

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


def check_compatible(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise before anything is copied if a name is unknown or a shape differs: no half-applied update."""
    targets = _targets(model)
    for name, shape in shapes.items():
        target = targets.get(name)
        if target is None:
            raise KeyError(f"weight {name!r} does not exist in the engine's model")
        if tuple(target.shape) != tuple(shape):
            raise ValueError(f"weight {name!r}: shape {tuple(shape)} does not match {tuple(target.shape)}")


def _targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (lm_head.weight when embeddings are tied) resolve to the same storage: either name works.
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers()))
    return targets


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor] | str | Path) -> int:
    """Copy named tensors (or a checkpoint directory's) into the model's same-named tensors; returns the count.

    Every name and shape is checked first, so a bad update leaves the model as it was.
    """
    if isinstance(weights, Mapping):
        check_compatible(model, {name: tuple(t.shape) for name, t in weights.items()})
        items: Iterator = iter(weights.items())
    else:
        check_compatible(model, safetensors_shapes(weights))
        items = iter_safetensors(weights)
    targets = _targets(model)
    count = 0
    for name, tensor in items:
        target = targets[name]
        target.copy_(tensor.to(device=target.device, dtype=target.dtype))
        count += 1
    return count
