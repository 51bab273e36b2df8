"""Metrics to Weights & Biases (--use-wandb); ``--wandb-mode offline`` writes the run locally, no network."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sluice.errors import ConfigError
from sluice.observability.scalars import scalar_items

DEFAULT_PROJECT = "sluice"


class WandbUnavailable(ConfigError):
    """wandb is not installed, or its run could not start (not logged in, no network in online mode)."""


class WandbWriter:
    """One W&B run: the config at start, each step's numeric metrics at ``step``.

    A resumed run passes the ``run_id`` saved in its checkpoint and continues that run. W&B refuses steps at
    or before the last one it has, so steps the crashed run logged after its checkpoint keep their first
    values there (metrics.jsonl holds the resumed run's).
    """

    def __init__(self, run_dir: str | os.PathLike[str], config: Mapping[str, Any], project: str | None = None,
                 group: str | None = None, mode: str | None = None, run_id: str | None = None) -> None:
        try:
            import wandb
        except ImportError as error:
            raise WandbUnavailable("--use-wandb needs the wandb package: pip install 'sluice[wandb]'") from error
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(
                project=project or DEFAULT_PROJECT, group=group, mode=mode, dir=str(run_dir), config=dict(config),
                id=run_id, resume="allow" if run_id else None,
                # console="off": wandb would otherwise wrap stdout, mangling progress bars and test capture.
                settings=wandb.Settings(console="off", silent=True))
        except Exception as error:  # wandb raises its own error types for login and network failures
            raise WandbUnavailable(f"--use-wandb: wandb could not start a run ({type(error).__name__}: {error}); "
                                   "log in with `wandb login`, or use --wandb-mode offline") from error

    @property
    def run_id(self) -> str:
        return self._run.id

    @property
    def run_dir(self) -> Path:
        """The run's own directory (RUN_DIR/wandb/<offline-|>run-<time>-<id>)."""
        return Path(self._run.dir).parent

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._run.log(dict(scalar_items(metrics)), step=step)

    def close(self) -> None:
        self._run.finish()
