"""Console progress: a tqdm bar on a terminal, one plain line per step in logs (where bars turn to noise)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TextIO

from tqdm import tqdm

from sluice.observability.keys import REWARD_MEAN, STEP_TIME, eval_accuracy_name


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a log line."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StageBar:
    """Progress of one stage inside a step (e.g. generating the rollout's samples); a no-op when disabled.

    Usable as a context manager so the bar is removed even when the stage raises.
    """

    def __init__(self, name: str, total: int | None, stream: TextIO | None) -> None:
        self._bar = (
            None if stream is None else tqdm(total=total, desc=name, file=stream, leave=False, dynamic_ncols=True)
        )

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ProgressReporter:
    """Shows training progress with a few key metrics: reward, eval accuracies, step time, and an ETA.

    On a terminal (and ``enabled``) this is a tqdm bar (its ETA after ``<``) with the metrics in its postfix.
    When disabled, or when the stream is not a TTY (a log file, a job scheduler), tqdm's carriage-return
    redraws would fill the log with fragments, so each step prints one compact line instead, ending in
    ``eta=``. Eval accuracies are remembered between updates because evals run only every few steps and
    should stay visible in between. ``initial_step``: steps already done (a resumed run); the ETA counts
    only the steps of this process.
    """

    def __init__(self, total_steps: int | None, enabled: bool = True, stream: TextIO | None = None,
                 initial_step: int = 0) -> None:
        self._total_steps = total_steps
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stdout
        self._use_bar = enabled and _is_tty(self._stream)
        self._bar = (
            tqdm(total=total_steps, initial=initial_step, desc="steps", file=self._stream, dynamic_ncols=True)
            if self._use_bar else None
        )
        self._eval_acc: dict[str, Any] = {}
        self._last_update = time.monotonic()
        self._start = (time.monotonic(), initial_step)

    @property
    def total_steps(self) -> int | None:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        """Settable after construction, for callers that learn the step count only once data is loaded."""
        self._total_steps = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    def _summarize(self, metrics: Mapping[str, Any]) -> dict[str, str]:
        """The short name -> formatted value pairs shown for one step.

        Step time is ``perf/step_time_s`` when the caller logs it, else the wall time since the last update.
        """
        now = time.monotonic()
        step_time = metrics.get(STEP_TIME, now - self._last_update)
        self._last_update = now
        for key, value in metrics.items():
            name = eval_accuracy_name(key)
            if name is not None and value is not None:
                self._eval_acc[name] = value
        shown: dict[str, str] = {}
        if metrics.get(REWARD_MEAN) is not None:
            shown["reward"] = _fmt(metrics[REWARD_MEAN])
        for name, value in self._eval_acc.items():
            shown[f"{name}_acc"] = _fmt(value)
        if step_time is not None:
            shown["step_time"] = f"{float(step_time):.1f}s"
        return shown

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Report that step ``step`` (0-based, as in metrics.jsonl) finished, with its metrics."""
        shown = self._summarize(metrics)
        done = step + 1
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        total = f"/{self.total_steps}" if self.total_steps is not None else ""
        eta = self._eta(done)
        if eta is not None:
            shown["eta"] = format_duration(eta)
        fields = " ".join(f"{name}={value}" for name, value in shown.items())
        print(f"step {done}{total} {fields}".rstrip(), file=self._stream, flush=True)

    def _eta(self, done: int) -> float | None:
        """Seconds left at this process's mean step time, or None without a known total."""
        started_at, first = self._start
        if self.total_steps is None or done <= first:
            return None
        return (time.monotonic() - started_at) / (done - first) * max(self.total_steps - done, 0)

    def write(self, line: str) -> None:
        """Print ``line`` on the console; above the bar when one is drawn (a plain print would tear it)."""
        if self._bar is not None:
            tqdm.write(line, file=self._stream)
        else:
            print(line, file=self._stream, flush=True)

    def outside_bar(self) -> AbstractContextManager[None]:
        """A context in which the caller's own prints land above the bar: the bar is cleared on entry and drawn
        again on exit (no bar: nothing to do)."""
        return tqdm.external_write_mode(file=self._stream) if self._bar is not None else nullcontext()

    def stage(self, name: str, total: int | None) -> StageBar:
        """A transient bar for a stage within a step; a no-op object when bars are off (see class doc)."""
        return StageBar(name, total, self._stream if self._use_bar else None)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
