"""The record every container yields, and the error every data problem raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DataError(ValueError):
    """A prompt file or one of its rows cannot be used; the message names the file (and line or row)."""


@dataclass(frozen=True)
class LocatedRow:
    """One row of a data file and a human-readable place for error messages."""

    where: str  # "data.jsonl:12" or "data.parquet row 3" (1-based); a shard's own path in a directory
    row: dict[str, Any]
