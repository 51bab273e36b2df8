"""Every metrics backend of a run behind one ``log``: metrics.jsonl always, TensorBoard and W&B when asked."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sluice.config import LoggingConfig
from sluice.observability.metrics import MetricsWriter


class Trackers:
    """Feeds each step's metrics to metrics.jsonl and to the backends --use-tensorboard / --use-wandb enable.

    ``resume_after_step``: a resumed run's checkpoint step; records past it are dropped (jsonl) or purged
    (TensorBoard), because the resumed run logs those steps again. ``wandb_run_id`` continues a W&B run.
    """

    def __init__(self, logging: LoggingConfig, run_config: Mapping[str, Any], resume_after_step: int | None = None,
                 wandb_run_id: str | None = None) -> None:
        run_dir = Path(logging.run_dir)
        self.jsonl = MetricsWriter(run_dir, resume_after_step=resume_after_step)
        self.tensorboard = None
        self.wandb = None
        try:
            if logging.use_tensorboard:
                from sluice.observability.tensorboard_writer import TensorBoardWriter

                self.tensorboard = TensorBoardWriter(logging.tensorboard_dir or run_dir / "tensorboard",
                                                     resume_after_step)
            if logging.use_wandb:
                from sluice.observability.wandb_writer import WandbWriter

                self.wandb = WandbWriter(run_dir, run_config, logging.wandb_project, logging.wandb_group,
                                         logging.wandb_mode, run_id=wandb_run_id)
        except BaseException:
            self.close()
            raise

    def log(self, metrics: Mapping[str, Any], step: int) -> dict[str, Any]:
        """Record ``metrics`` at ``step`` everywhere; returns the jsonl record."""
        record = self.jsonl.log(metrics, step)
        for backend in (self.tensorboard, self.wandb):
            if backend is not None:
                backend.log(metrics, step)
        return record

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to continue the same tracker runs."""
        return {"wandb_run_id": self.wandb.run_id if self.wandb is not None else None}

    def close(self) -> None:
        for backend in (self.jsonl, self.tensorboard, self.wandb):
            if backend is not None:
                backend.close()
        self.tensorboard = self.wandb = None
