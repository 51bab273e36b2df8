"""Reading prompt rows from a data path (see ``containers.py``), optionally sliced as ``path@[a:b]``.

The slice is over the rows of all shards in order, and only the shards (and parquet row groups) that overlap it
are read; rows stream from the shards, so a large file is never held whole, only the rows picked.
Every row keeps where it came from (``file:line`` for jsonl, ``file row N`` otherwise, the shard's own path in a
directory) so that a bad row found later, e.g. a missing key while building prompts, can be reported at its
exact place; a dataset of a million lines is not debuggable from "KeyError: 'input'".
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sluice.data.containers import shards_of
from sluice.data.rows import DataError, LocatedRow
from sluice.data.shards import Shard


# ``path@[a:b]``: the path is everything before the last "@[" that closes with "]" at the very end.
_SLICED = re.compile(r"^(?P<path>.+)@\[(?P<body>[^\[\]]*)\]$")
_SLICE_BODY = re.compile(r"^\s*(?P<start>[+-]?\d+)?\s*:\s*(?P<stop>[+-]?\d+)?\s*$")

__all__ = ["DataError", "LocatedRow", "parse_spec", "iter_located_rows", "read_rows", "count_rows"]


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


def empty_slice_error(path: Path, cut: slice | None, total: int) -> DataError:
    start, stop = ("" if v is None else v for v in ((cut.start, cut.stop) if cut else (None, None)))
    return DataError(f"{path}: slice [{start}:{stop}] of {total} rows selects no rows")


def no_rows_error(path: Path, shards: list[Shard]) -> DataError:
    what = "file has" if len(shards) == 1 and path.is_file() else f"its {len(shards)} shard(s) have"
    return DataError(f"{path}: {what} no rows (empty, or only blank lines)")


def _bounds(shards: list[Shard], cut: slice | None) -> tuple[int, int | None]:
    """``cut`` as absolute positions; the total row count is needed (and counted) only for negative bounds."""
    if cut is None:
        return 0, None
    if (cut.start or 0) >= 0 and (cut.stop is None or cut.stop >= 0):
        return cut.start or 0, cut.stop
    picked = range(sum(shard.num_rows() for shard in shards))[cut]
    return picked.start, picked.stop


def _select(shards: list[Shard], start: int, stop: int | None) -> Iterator[LocatedRow]:
    """Rows ``start <= i < stop`` of the shards' concatenation; shards wholly outside are not read."""
    offset = 0
    for shard in shards:
        if stop is not None and offset >= stop:
            return
        # A shard that may lie wholly before ``start`` is counted first (free for parquet and Arrow).
        if start > offset and start >= offset + shard.num_rows():
            offset += shard.num_rows()
            continue
        local_start, num_yielded = max(start - offset, 0), 0
        for located in shard.rows(local_start, None if stop is None else stop - offset):
            num_yielded += 1
            yield located
        if stop is not None and offset + local_start + num_yielded >= stop:
            return  # the slice ends in this shard: the rest of it (and its count) is never needed
        offset += shard.num_rows()  # known by now: counted above, or read to its end


def iter_located_rows(spec: str) -> Iterator[LocatedRow]:
    """Stream the rows of ``spec`` (``path`` or ``path@[a:b]``, Python slice semantics) with their places."""
    path, cut = parse_spec(spec)
    shards = shards_of(path)
    start, stop = _bounds(shards, cut)
    empty = True
    for located in _select(shards, start, stop):
        empty = False
        yield located
    if empty:
        total = sum(shard.num_rows() for shard in shards)
        if total == 0:
            raise no_rows_error(path, shards)
        raise empty_slice_error(path, cut, total)


def read_rows(spec: str) -> list[dict[str, Any]]:
    """The rows of ``spec`` (a file, a directory of shards, a glob; optionally sliced as ``path@[a:b]``)."""
    return [located.row for located in iter_located_rows(spec)]


def count_rows(spec: str) -> int:
    """How many rows ``spec`` selects, from file metadata where the format has it (one pass for jsonl)."""
    path, cut = parse_spec(spec)
    total = sum(shard.num_rows() for shard in shards_of(path))
    return len(range(total)[cut]) if cut is not None else total
