"""The wire format of a weight-sync bucket, shared by the trainer that sends it and the engine that receives it.

A bucket is a list of HF-named tensors sent in one go. In the ``flattened_bucket`` form (our extension of
SGLang's ``/update_weights_from_distributed``) its tensors travel as one contiguous byte buffer: each tensor's
bytes start at an offset aligned to ``BUCKET_ALIGN`` (so the engine's views of the buffer are aligned for every
dtype), and both sides compute the offsets from the posted names, dtypes and shapes with ``bucket_layout``.

Checksums: each tensor's checksum is the sum of its bytes read as int64 words, modulo 2**64 (two's-complement
wraparound, which every torch backend's integer sum does), plus a tail of fewer than 8 bytes added byte by byte.
Modular integer sums are exact and order-independent, so a GPU trainer and a CPU engine agree bit for bit
whatever their reduction trees; any change to a single word (a flipped bit, a zeroed or truncated tensor)
changes the sum. It is one native-width reduction per tensor, memory-bandwidth bound (summing int32 words into
an int64 accumulator instead is ~15x slower on a CPU). It is no cryptographic hash: it guards against transport
and bookkeeping bugs, not adversaries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

BUCKET_ALIGN = 64  # bytes; a multiple of every element size, and of a cache line
FLATTENED_BUCKET = "flattened_bucket"  # the load_format value of the one-collective-per-bucket form


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in a flattened bucket."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer
    num_bytes: int


def tensor_num_bytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


def bucket_layout(names: Sequence[str], dtypes: Sequence[torch.dtype],
                  shapes: Sequence[Sequence[int]]) -> tuple[list[TensorSlot], int]:
    """The slots of a flattened bucket, in the given order, and the buffer's total size in bytes."""
    slots, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        size = tensor_num_bytes(dtype, shape)
        slots.append(TensorSlot(name, dtype, tuple(int(s) for s in shape), offset, size))
        offset += -(-size // BUCKET_ALIGN) * BUCKET_ALIGN
    return slots, offset


def flatten_bucket(tensors: Sequence[torch.Tensor], slots: Sequence[TensorSlot], total_bytes: int,
                   device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """One uint8 buffer on ``device`` holding every tensor's bytes at its slot, padding zeroed.

    ``out``: a uint8 buffer of at least ``total_bytes`` to fill (its first ``total_bytes`` are returned). Reusing
    one matters on a CPU, where a fresh 512 MiB buffer costs more page faults than its copy.
    """
    buffer = out[:total_bytes] if out is not None else torch.empty(total_bytes, dtype=torch.uint8, device=device)
    end = 0
    for tensor, slot in zip(tensors, slots):
        if slot.offset > end:
            buffer[end : slot.offset].zero_()
        # Blocking on purpose: a device-to-host copy must have landed before gloo reads the buffer (a
        # device-to-device copy is queued on the stream either way, ahead of the NCCL broadcast).
        buffer[slot.offset : slot.offset + slot.num_bytes].copy_(_as_bytes(tensor))
        end = slot.offset + slot.num_bytes
    if total_bytes > end:
        buffer[end:].zero_()
    return buffer


def unflatten_bucket(buffer: torch.Tensor, slots: Sequence[TensorSlot]) -> dict[str, torch.Tensor]:
    """Views of the received buffer, one per slot, with the slot's dtype and shape (no copy)."""
    return {slot.name: buffer[slot.offset : slot.offset + slot.num_bytes].view(slot.dtype).view(slot.shape)
            for slot in slots}


def tensor_checksums(tensors: Iterable[torch.Tensor]) -> list[int]:
    """Each tensor's checksum (see the module docstring); one host sync per device, not one per tensor."""
    tensors = list(tensors)
    sums: list = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    for indices in by_device.values():
        values = torch.stack([_checksum(tensors[i]) for i in indices]).tolist()
        for index, value in zip(indices, values):
            sums[index] = int(value)
    return sums


def named_checksums(named: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return dict(zip(named, tensor_checksums(named.values())))


def checksum_mismatches(named: Mapping[str, torch.Tensor], expected: Mapping[str, int]) -> list[str]:
    """One line per tensor whose checksum differs from ``expected`` or that is missing on either side."""
    problems = [f"tensor {name!r} is missing" for name in expected if name not in named]
    problems += [f"tensor {name!r} has no checksum" for name in named if name not in expected]
    common = [name for name in named if name in expected]
    for name, value in zip(common, tensor_checksums(named[name] for name in common)):
        if value != expected[name]:
            problems.append(f"tensor {name!r}: checksum {value} != expected {expected[name]}")
    return problems


def weights_digest(checksums: Mapping[str, int]) -> str:
    """One hex digest of a set of per-tensor checksums, independent of their order."""
    digest = hashlib.sha256()
    for name in sorted(checksums):
        digest.update(f"{name}={checksums[name]};".encode())
    return digest.hexdigest()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 tensor on the tensor's device."""
    data = _as_bytes(tensor)
    if data.storage_offset() % 8:  # a view (e.g. k_proj's rows of a fused qkv) not aligned for int64 words
        data = data.clone()
    num_words = data.numel() // 8
    total = data[: num_words * 8].view(torch.int64).sum()
    if data.numel() % 8:
        total = total + data[num_words * 8 :].sum(dtype=torch.int64)
    return total
