"""Failures of the user's functions during a rollout, reported once in full and then counted.

A reward (or generate) function that raises fails only its sample (rollout/failures.py), and a broken one fails
every sample: a warning per sample would bury the one thing worth reading, the traceback. So the first failure of
each (function, error type) in the run is logged with its traceback, cut to the user's frames (the rollout's own
and asyncio's frames above them say nothing about the bug), and every failure is counted; ``flush`` then logs one
line per (function, error type) for the step, naming how often and the first sample and group it hit.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

from sluice.tracebacks import user_traceback
from sluice.types import Sample

log = logging.getLogger("sluice.rollout")


def function_name(fn: Callable[..., Any]) -> str:
    """How reports name a hook's function: the path the user gave for a plug-in (its adapter's
    ``plugin_path``), else ``module.qualname``."""
    if isinstance(getattr(fn, "plugin_path", None), str):
        return fn.plugin_path
    target = inspect.unwrap(fn)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    return f"{module}.{name}" if module else name


@dataclass
class _Count:
    num_failures: int
    first_sample: int
    first_group: int


class PluginFailures:
    """Counts failures by (function, error type); logs each pair's first traceback of the run at once."""

    def __init__(self) -> None:
        self._shown: set[tuple[str, str]] = set()  # pairs whose traceback has been logged
        self._counts: dict[tuple[str, str], _Count] = {}  # since the last flush

    def record(self, what: str, error: BaseException, sample: Sample) -> None:
        """``what`` failed on ``sample`` with ``error``; ``what`` names the hook and function,
        e.g. "reward fn mymod.score"."""
        key = (what, type(error).__name__)
        if key not in self._shown:
            self._shown.add(key)
            log.warning("%s raised %s on sample %d (group %d); later failures are counted per step:\n%s",
                        what, key[1], sample.index, sample.group_index, user_traceback(error))
        count = self._counts.get(key)
        if count is None:
            self._counts[key] = _Count(1, sample.index, sample.group_index)
        else:
            count.num_failures += 1

    def flush(self, scope: str = "this step") -> list[str]:
        """Log (and return) one line per (function, error type) failed since the last flush; reset the counts."""
        lines = [f"{what} raised {error_type} {count.num_failures} time{'s' if count.num_failures != 1 else ''} "
                 f"{scope} (first: sample {count.first_sample}, group {count.first_group})"
                 for (what, error_type), count in self._counts.items()]
        self._counts.clear()
        for line in lines:
            log.warning("%s", line)
        return lines
