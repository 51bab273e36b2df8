"""Reading prompt rows from ``.jsonl`` and ``.parquet`` files, optionally sliced as ``path@[a:b]``.

Every row keeps where it came from (``file:line`` for jsonl, ``file row N`` for parquet) so that a bad row
found later, e.g. a missing key while building prompts, can be reported at its exact place in the file;
a dataset of a million lines is not debuggable from "KeyError: 'input'".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_EXTENSIONS = (".jsonl", ".parquet")

# ``path@[a:b]``: the path is everything before the last "@[" that closes with "]" at the very end.
_SLICED = re.compile(r"^(?P<path>.+)@\[(?P<body>[^\[\]]*)\]$")
_SLICE_BODY = re.compile(r"^\s*(?P<start>[+-]?\d+)?\s*:\s*(?P<stop>[+-]?\d+)?\s*$")


class DataError(ValueError):
    """A prompt file or one of its rows cannot be used; the message names the file (and line or row)."""


@dataclass(frozen=True)
class LocatedRow:
    """One row of a data file and a human-readable place for error messages."""

    where: str  # "data.jsonl:12" or "data.parquet row 3" (1-based)
    row: dict[str, Any]


def parse_spec(spec: str) -> tuple[Path, slice | None]:
    """Split ``path@[a:b]`` into the path and a ``slice`` (None when the spec has no slice part)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"prompt data spec must be a non-empty path, got {spec!r}")
    match = _SLICED.match(spec)
    if match is None:
        if "@[" in spec:
            raise DataError(f"bad slice in {spec!r}: expected path@[start:stop], e.g. data.jsonl@[:100]")
        return Path(spec), None
    body = _SLICE_BODY.match(match["body"])
    if body is None:
        raise DataError(
            f"bad slice [{match['body']}] in {spec!r}: expected [start:stop] with optional integers, "
            "e.g. @[:100], @[10:], @[-5:]"
        )
    start = int(body["start"]) if body["start"] is not None else None
    stop = int(body["stop"]) if body["stop"] is not None else None
    return Path(match["path"]), slice(start, stop)


def _empty_slice(path: Path, cut: slice | None, total: int) -> DataError:
    start, stop = ("" if v is None else v for v in ((cut.start, cut.stop) if cut else (None, None)))
    return DataError(f"{path}: slice [{start}:{stop}] of {total} rows selects no rows")


def _jsonl_rows(path: Path, cut: slice | None) -> list[LocatedRow]:
    """Parse the non-blank lines picked by ``cut``; lines outside the slice are not parsed at all."""
    with path.open("r", encoding="utf-8") as handle:
        lines = [(number, text) for number, text in enumerate(handle, start=1) if text.strip()]
    if not lines:
        raise DataError(f"{path}: file has no rows (empty or only blank lines)")
    picked = lines[cut] if cut is not None else lines
    if not picked:
        raise _empty_slice(path, cut, len(lines))
    rows = []
    for number, text in picked:
        where = f"{path}:{number}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(value, dict):
            raise DataError(f"{where}: each line must be a JSON object, got {type(value).__name__}")
        rows.append(LocatedRow(where, value))
    return rows


def _parquet_rows(path: Path, cut: slice | None) -> list[LocatedRow]:
    import pyarrow.parquet as pq  # imported here: only parquet users pay for it

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt or non-parquet files
        raise DataError(f"{path}: cannot read as parquet: {exc}") from exc
    if table.num_rows == 0:
        raise DataError(f"{path}: file has no rows")
    positions = range(table.num_rows)[cut] if cut is not None else range(table.num_rows)
    if not positions:
        raise _empty_slice(path, cut, table.num_rows)
    picked = table.slice(positions.start, len(positions)).to_pylist()  # a slice without step is contiguous
    return [LocatedRow(f"{path} row {i + 1}", row) for i, row in zip(positions, picked)]


def read_located_rows(spec: str) -> list[LocatedRow]:
    """Rows of ``spec`` (``path`` or ``path@[a:b]``, Python slice semantics) with their places in the file."""
    path, cut = parse_spec(spec)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise DataError(f"{path}: unknown extension {suffix or '(none)'!r}; supported: {supported}")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    return _jsonl_rows(path, cut) if suffix == ".jsonl" else _parquet_rows(path, cut)


def read_rows(spec: str) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` or ``.parquet`` file, optionally sliced as ``path@[a:b]``; blank lines skipped."""
    return [located.row for located in read_located_rows(spec)]
