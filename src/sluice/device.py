"""Resolving the device and dtype names used in the config (`auto`, `cpu`, `cuda:1`, `bfloat16`), and small
host-to-device copies that do not wait for the stream."""

from __future__ import annotations

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPUs and float32 on CPUs (where bfloat16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or array on ``device``. On GPU the copy is pinned and asynchronous: a pageable copy would wait
    for the work already queued on the stream (the engine queues a step ahead)."""
    tensor = torch.as_tensor(values, dtype=dtype) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    return tensor_to_device(tensor, device)


def tensor_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor goes to a GPU through pinned memory, without waiting for the stream."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
