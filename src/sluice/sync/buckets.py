"""Splitting the trainer's weights into broadcast buckets of at most ``--update-weight-buffer-size`` bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sluice.sync.interface import NamedWeights
from sluice.weights.buckets import BUCKET_ALIGN, TensorSlot, bucket_layout, flatten_bucket


@dataclass
class Bucket:
    """Consecutive weights sent by one collective (flattened form) or one engine call (per-tensor form)."""

    names: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def dtypes(self) -> list[torch.dtype]:
        return [t.dtype for t in self.tensors]

    @property
    def shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in self.tensors]

    def layout(self) -> tuple[list[TensorSlot], int]:
        return bucket_layout(self.names, self.dtypes, self.shapes)

    @property
    def flat_bytes(self) -> int:
        return self.layout()[1]

    def flatten(self, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bucket as one byte buffer on ``device`` (a device-to-device copy when the weights live there),
        written into ``out`` when given (see ``flatten_bucket``)."""
        slots, total = self.layout()
        return flatten_bucket(self.tensors, slots, total, device, out)


def plan_buckets(weights: NamedWeights, max_bytes: int) -> list[Bucket]:
    """Weights in order, cut into buckets whose flattened size (alignment padding included) stays within
    ``max_bytes``; a single tensor larger than that travels alone."""
    buckets = [Bucket()]
    used = 0
    for name, tensor in weights.items():
        size = -(-tensor.numel() * tensor.element_size() // BUCKET_ALIGN) * BUCKET_ALIGN
        if buckets[-1].names and used + size > max_bytes:
            buckets.append(Bucket())
            used = 0
        buckets[-1].names.append(name)
        buckets[-1].tensors.append(tensor)
        used += size
    return [bucket for bucket in buckets if bucket.names]
