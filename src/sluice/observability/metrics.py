"""Per-step metrics as JSON lines: greppable, appendable across restarts, readable without any tracker."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

METRICS_FILE = "metrics.jsonl"


def json_safe(value: Any, key: str = "") -> Any:
    """``value`` as something ``json.dumps`` writes as standard JSON.

    Tensors and numpy values (anything with ``.tolist()``) become Python numbers or lists (0-d ones numbers),
    so callers can log ``loss`` straight from the trainer. NaN and +-inf become null, since standard JSON
    has no spelling for them and a NaN loss must not make the file unreadable by other tools. Unknown types
    raise a TypeError naming the key: a silent ``str()`` would hide a metric that was never a number.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, key) for v in value]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and numpy scalars: to Python numbers/lists
        return json_safe(value.tolist(), key)
    raise TypeError(f"metric {key!r} has a value of type {type(value).__name__} that is not JSON-safe: {value!r}")


class MetricsWriter:
    """Appends one JSON object per ``log`` call to ``run_dir/metrics.jsonl``.

    Each line is flushed as it is written so a crashed or killed run keeps every step it finished, and a
    ``tail -f`` sees steps as they happen. The file is opened in append mode so a resumed run continues it.
    """

    def __init__(self, run_dir: str | os.PathLike[str], resume_after_step: int | None = None) -> None:
        """``resume_after_step``: drop records past that step first (a resumed run logs those steps again)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.continues_file = self.path.exists()  # appending to an earlier run's (or attempt's) records
        self.last_step = -1  # the highest step written (-1: none; earlier records count only on a resume)
        if resume_after_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_after_step]
            self.path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept), encoding="utf-8")
            self.last_step = max((r.get("step", 0) for r in kept), default=-1)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int) -> dict[str, Any]:
        """Write ``{"step": step, **metrics}`` (the ``step`` argument wins); returns the record as written."""
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        record: dict[str, Any] = {"step": int(step)}
        record.update((k, v) for k, v in json_safe(dict(metrics)).items() if k != "step")
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self.last_step = max(self.last_step, record["step"])
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a metrics file (or of ``path/metrics.jsonl`` when ``path`` is a run directory).

    A final line that does not parse is skipped: it is a record cut short by a crash mid-write. A bad line
    anywhere else means the file is corrupt, and raises with its line number.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON object: {exc}") from exc
    return records
