"""Where a resume starts (--load) and whether the checkpoint found there may continue under this config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sluice.checkpoint.compat import changed_settings, model_shape, resume_mismatches
from sluice.checkpoint.store import TRAINER_FILE, find_latest
from sluice.config import ConfigError


def resume_checkpoint(load: str, save: str | None) -> Path | None:
    """The checkpoint directory --load names: ``LOAD/latest``, or LOAD itself when it is one checkpoint.

    None when LOAD is the --save directory and holds no checkpoint yet: a first launch of a command line
    that is simply relaunched after a crash. Any other --load without a checkpoint is an error.
    """
    root = Path(load)
    try:
        latest = find_latest(root)
    except FileNotFoundError as error:
        raise ConfigError(f"--load {load}: {error}") from error
    if latest is not None:
        return latest
    if (root / TRAINER_FILE).is_file():
        return root
    if save is not None and _same_dir(root, Path(save)):
        return None
    raise ConfigError(f"--load {load}: no checkpoint there (expected {load}/latest or {load}/{TRAINER_FILE})")


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def read_model_shape(hf_checkpoint: str) -> dict[str, Any]:
    """The shape-defining fields of ``hf_checkpoint``'s config.json."""
    return model_shape(json.loads((Path(hf_checkpoint) / "config.json").read_text()))


def check_resumable(state: dict[str, Any], flags: dict[str, Any], shape: dict[str, Any], load: str) -> list[str]:
    """Raise ConfigError naming every incompatible field; return the allowed changes (for the log).

    A checkpoint saved before configs were recorded is not checked (its data cursor still is, by the source).
    """
    saved_flags = state.get("config")
    if saved_flags is None:
        return ["(the checkpoint records no config; its compatibility was not checked)"]
    problems = resume_mismatches(saved_flags, flags, state.get("model_shape"), shape)
    if problems:
        raise ConfigError(f"--load {load}: the checkpoint was saved by an incompatible run; these settings differ "
                          "(change them back, or start a new run without --load):\n  " + "\n  ".join(problems))
    return changed_settings(saved_flags, flags)
