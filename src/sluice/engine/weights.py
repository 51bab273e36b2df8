"""Loading weights into an engine model: HF safetensors directories and in-memory named tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open


def iter_safetensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every *.safetensors file of an HF checkpoint directory."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


@torch.no_grad()
def copy_named_tensors(model: torch.nn.Module, weights: Mapping[str, torch.Tensor] | Iterator) -> int:
    """Copy tensors into the parameters/buffers of the same HF names; return how many were copied.

    An unknown name or a shape mismatch is an error (a silent skip would leave stale weights behind).
    Tied weights (lm_head.weight when embeddings are tied) resolve to the same storage, so either name works.
    """
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers()))
    items = weights.items() if isinstance(weights, Mapping) else weights
    count = 0
    for name, tensor in items:
        target = targets.get(name)
        if target is None:
            raise KeyError(f"weight {name!r} does not exist in the engine's model")
        if target.shape != tensor.shape:
            raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} does not match {tuple(target.shape)}")
        target.copy_(tensor.to(device=target.device, dtype=target.dtype))
        count += 1
    return count
