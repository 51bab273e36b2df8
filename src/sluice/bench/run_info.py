"""What a benchmark report says about where it ran (commit, device, torch), and the clock it reads."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch


def git_commit() -> str:
    if os.environ.get("SLUICE_COMMIT"):  # a copy of the tree without its git history (the GPU machine)
        return os.environ["SLUICE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced_clock(device: torch.device) -> float:
    """perf_counter once the device has finished all queued work: reading the clock without waiting would time
    the launches, not the work."""
    sync_device(device)
    return time.perf_counter()


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory tensors held since the last ``reset_peak_memory``; None on CPU."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
