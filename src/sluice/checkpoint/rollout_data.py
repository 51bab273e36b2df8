"""Rollouts on disk for debugging (--save-debug-rollout-data / --load-debug-rollout-data).

One JSON file per rollout: its scored sample groups, every ``Sample`` field included (tokens, rollout
logprobs, rewards, loss masks, status, metadata). JSON keeps the file readable with any tool, and Python
writes floats with ``repr``, which reads back to the same bits, so a replay trains on exactly what was
generated. NaN rewards are written as ``NaN`` (Python's JSON extension) rather than lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from sluice.types import Sample, SampleGroup, Status

FORMAT = "sluice.rollout_data"
VERSION = 1
_SAMPLE_FIELDS = {f.name for f in dataclasses.fields(Sample)}


def rollout_data_path(template: str, rollout_id: int) -> Path:
    return Path(template.format(rollout_id=rollout_id))


def _plain(value: Any) -> Any:
    """json.dumps fallback: numpy and torch values (metadata from parquet rows, plug-ins) as Python numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a value of type {type(value).__name__} cannot be saved as rollout data: {value!r}")


def save_rollout_data(path: str | Path, rollout_id: int, groups: list[SampleGroup]) -> Path:
    """Write the groups of rollout ``rollout_id`` to ``path`` (atomically: a crash leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "version": VERSION, "rollout_id": rollout_id,
              "groups": [[dataclasses.asdict(s) for s in g.samples] for g in groups]}
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(record, default=_plain), encoding="utf-8")
    os.replace(staging, path)
    return path


def _sample(fields: dict[str, Any], where: str) -> Sample:
    unknown = sorted(set(fields) - _SAMPLE_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown sample fields {unknown}")
    return Sample(**{**fields, "status": Status(fields.get("status", Status.PENDING.value))})


def load_rollout_data(path: str | Path, rollout_id: int | None = None) -> list[SampleGroup]:
    """The groups saved at ``path``; with ``rollout_id``, a file saved for another rollout is refused (pass None
    to replay one file at every step)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such rollout data file")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sluice rollout data file")
    if record.get("version") != VERSION:
        raise ValueError(f"{path}: rollout data version {record.get('version')!r}, this sluice reads {VERSION}")
    if rollout_id is not None and record.get("rollout_id") != rollout_id:
        raise ValueError(f"{path}: holds rollout {record.get('rollout_id')}, expected rollout {rollout_id}")
    return [SampleGroup([_sample(s, f"{path}") for s in group]) for group in record["groups"]]

