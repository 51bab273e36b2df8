"""Metrics as TensorBoard event files (--use-tensorboard), one scalar series per metric name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sluice.observability.scalars import scalar_items


class TensorBoardWriter:
    """Writes each step's numeric metrics with ``torch.utils.tensorboard.SummaryWriter``.

    A resumed run passes ``resume_after_step``: the writer then records a purge marker, and TensorBoard's
    reader drops the earlier events past that step (the resumed run logs those steps again), as
    metrics.jsonl drops its records past the checkpoint.
    """

    def __init__(self, log_dir: str | os.PathLike[str], resume_after_step: int | None = None) -> None:
        # Imported here: tensorboard takes seconds to import and only runs that ask for it pay that.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        purge_step = None if resume_after_step is None else resume_after_step + 1
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in scalar_items(metrics):
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # a killed run keeps every finished step, as in metrics.jsonl

    def close(self) -> None:
        self._writer.close()
