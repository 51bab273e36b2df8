"""Where each step's metrics go: the trackers (metrics.jsonl, TensorBoard, W&B), the progress bar, a log
line for the evaluation before training, and the learning-signal warnings (signal.py); and where its example
samples go (samples.jsonl and the console)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sluice.observability.progress import ProgressReporter
from sluice.observability.samples import SampleLog
from sluice.observability.signal import SignalWatch
from sluice.observability.trackers import Trackers


class StepLog:
    def __init__(self, trackers: Trackers, progress: ProgressReporter, log_line: Callable[[str], None],
                 samples: SampleLog | None = None) -> None:
        self.trackers, self.progress, self.log_line = trackers, progress, log_line
        self.signal = SignalWatch(self._log_outside_bar)
        self.samples = samples  # the rollout's finisher and the evaluator record their examples here

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """The metrics of ``step`` completed rollout steps (0: the evaluation before training)."""
        self.trackers.log(metrics, step=step)
        if step == 0:
            self.log_line("before training: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())))
        else:
            self.progress.update(step - 1, metrics)
            self.signal.check(step, metrics)

    def _log_outside_bar(self, line: str) -> None:
        with self.progress.outside_bar():  # the run's log may print: keep the line off the drawn bar
            self.log_line(line)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue the same tracker runs on resume."""
        return self.trackers.state_dict()

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()
        self.progress.close()
        self.trackers.close()
