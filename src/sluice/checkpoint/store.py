"""Checkpoint directories: ``SAVE/rollout_000012/`` written atomically, ``SAVE/latest`` names the newest.

A save writes every file into a hidden staging sibling, flushes each to disk, renames the whole directory into
place and only then repoints ``latest`` (itself replaced by rename). A crash at any point leaves ``latest``
naming a complete checkpoint: either the previous one or the new one. Leftover staging directories are never
read and are removed by the next save.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from sluice.checkpoint.atomic import fsync_dir, move_into_place
from sluice.checkpoint.hf_export import export_hf

LATEST_FILE = "latest"
TRAINER_FILE = "trainer.pt"
RUN_STATE_FILE = "run_state.pt"
CONFIG_FILE = "config.yaml"
HF_DIR = "hf"
_CHECKPOINT_NAME = re.compile(r"^rollout_(\d+)$")

# Called with the name of each part once it is on disk (trainer.pt, run_state.pt, hf, config.yaml, staged,
# renamed, latest); tests kill the process there to check that a crash mid-save keeps the previous checkpoint.
AfterWrite = Callable[[str], None]


def checkpoint_name(rollout_id: int) -> str:
    return f"rollout_{rollout_id:06d}"


def save_checkpoint(root: str | Path, rollout_id: int, trainer, extra_state: dict, *, tokenizer=None,
                    write_config: Callable[[Path], None] | None = None, with_optimizer: bool = True,
                    keep_last: int | None = None, after_write: AfterWrite | None = None) -> Path:
    """Save the trainer, ``extra_state`` (data cursor, RNG, counters) and an HF export of the actor.

    ``tokenizer`` is saved with the export so ``hf/`` is a complete model directory; ``write_config(path)``
    writes the run's config.yaml; ``with_optimizer=False`` (--no-save-optim) leaves the optimizer moments out;
    ``keep_last`` deletes all but the newest N checkpoints once the new one is in place.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    notify = after_write or (lambda part: None)
    final = root / checkpoint_name(rollout_id)
    staging = root / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # a crashed save's leftovers
    staging.mkdir()
    try:
        _save_file(trainer.state_dict(with_optimizer=with_optimizer), staging / TRAINER_FILE)
        notify(TRAINER_FILE)
        _save_file({"rollout_id": rollout_id, **extra_state}, staging / RUN_STATE_FILE)
        notify(RUN_STATE_FILE)
        export_hf(trainer.model, tokenizer, staging / HF_DIR, atomic=False)
        notify(HF_DIR)
        if write_config is not None:
            write_config(staging / CONFIG_FILE)
            _fsync_file(staging / CONFIG_FILE)
            notify(CONFIG_FILE)
        fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed write (disk full, ...) leaves nothing behind
        raise
    notify("staged")
    move_into_place(staging, final)
    notify("renamed")
    _point_latest(root, final.name)
    notify(LATEST_FILE)
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def _save_file(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def _fsync_file(path: Path) -> None:
    """Flush a written file to the disk: a rename is only as durable as the data it points at."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point_latest(root: Path, name: str) -> None:
    marker = root / f".{LATEST_FILE}.tmp"
    marker.write_text(name + "\n")
    _fsync_file(marker)
    os.replace(marker, root / LATEST_FILE)
    fsync_dir(root)


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoint directories under ``root``, oldest rollout first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return [path for _, path in sorted(found)]


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (never the one ``latest`` names); returns the deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    marker = Path(root) / LATEST_FILE
    latest = marker.read_text().strip() if marker.exists() else None
    doomed = [p for p in list_checkpoints(root)[:-keep_last] if p.name != latest]
    for path in doomed:
        # Renamed first, so a crash mid-delete leaves a hidden directory, not a half-deleted checkpoint.
        hidden = path.parent / f".{path.name}.deleting"
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is no ``latest``."""
    root = Path(root)
    marker = root / LATEST_FILE
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    retired = root / f".{path.name}.old"
    if not path.is_dir() and retired.is_dir():  # a crash between the two renames of a re-save
        os.replace(retired, path)
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: str | Path, trainer) -> dict:
    """Restore the trainer from ``path`` (when given one); returns the run state saved with it."""
    path = Path(path)
    if trainer is not None:
        trainer.load_state_dict(torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False))
    return load_run_state(path)


def load_run_state(path: str | Path) -> dict:
    """The run state (rollout_id, data cursor, RNG, config, ...) of a checkpoint, without touching a trainer."""
    return torch.load(Path(path) / RUN_STATE_FILE, map_location="cpu", weights_only=False)


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
