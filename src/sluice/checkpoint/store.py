"""Checkpoint directories: ``SAVE/rollout_000012/`` written atomically, ``SAVE/latest`` names the newest.

A checkpoint is written to a temporary sibling and renamed into place, so a crash mid-save never leaves a
half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

LATEST_FILE = "latest"


def save_checkpoint(root: str | Path, rollout_id: int, trainer, extra_state: dict) -> Path:
    """Save trainer state (+ HF weights for export) and ``extra_state`` (data cursor, counters)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"rollout_{rollout_id:06d}"
    staging = root / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    torch.save(trainer.state_dict(), staging / "trainer.pt")
    torch.save({"rollout_id": rollout_id, **extra_state}, staging / "run_state.pt")
    trainer.save_hf(staging / "hf")
    if final.exists():  # a re-save of the same step: move the old copy aside before the new one lands
        retired = root / f".{final.name}.old"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    (root / f".{LATEST_FILE}.tmp").write_text(final.name + "\n")
    os.replace(root / f".{LATEST_FILE}.tmp", root / LATEST_FILE)
    return final


def find_latest(root: str | Path) -> Path | None:
    marker = Path(root) / LATEST_FILE
    if not marker.exists():
        return None
    path = Path(root) / marker.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: str | Path, trainer) -> dict:
    """Restore the trainer from ``path``; returns the run state saved with it (rollout_id, ...)."""
    path = Path(path)
    trainer.load_state_dict(torch.load(path / "trainer.pt", map_location="cpu", weights_only=False))
    return torch.load(path / "run_state.pt", map_location="cpu", weights_only=False)


def capture_rng_state() -> dict:
    """The global torch random streams (CPU and every GPU): engine sampling draws from them."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
