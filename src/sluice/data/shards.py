"""One data file each: its row count and its rows in a position range, streamed.

A shard never holds the whole file in Python objects: jsonl is read line by line (gzip and zstd decompressed on
the fly; ``jsonl_shard.py``), parquet batch by batch within the row groups that overlap the range, Arrow record
batch by record batch from a memory map. Counting is cheap where the format records it (parquet footers, Arrow
batch headers) and one pass without JSON parsing for jsonl, cached once done.

``count_rows_up_to`` counts only as far as a slice needs: a jsonl file's index stops at the slice's last row, so
reading rows [a, b) of a large file indexes about b lines, not the file.

``rows_at`` reads rows at scattered positions, for the shuffled prompt order: a plain jsonl file by seeking to
each row (a line index built by the counting pass, 8 bytes per row), a compressed one from spans of its text that
the counting pass decompressed and can resume at (``compressed_spans.py``), parquet by its row groups, Arrow from a
memory map. What a format can only read whole (a row group, a mapped file, a span of a compressed jsonl text) is
a block, kept in a shared ``BlockCache`` bounded in bytes.

Positions are 0-based indices of rows (blank jsonl lines are not rows); places in messages are 1-based lines
for jsonl (``file:line``) and 1-based rows otherwise (``file row N``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sluice.data.block_cache import BlockCache
from sluice.data.rows import DataError, LocatedRow

_BATCH_ROWS = 1024  # rows converted to Python objects at a time


class Shard(Protocol):
    """A single data file of a container."""

    path: Path

    def num_rows(self) -> int: ...

    def count_rows_up_to(self, limit: int | None, cache: BlockCache | None = None) -> int:
        """``min(num_rows(), limit)`` (``limit`` None: ``num_rows()``), reading only what that needs: a jsonl
        file is indexed up to row ``limit``, and blocks decoded on the way may be kept in ``cache``."""
        ...

    def rows(self, start: int, stop: int | None) -> Iterator[LocatedRow]:
        """Rows at positions ``start <= i < stop`` (``stop`` None: to the end), in file order."""
        ...

    def rows_at(self, positions: np.ndarray, cache: BlockCache) -> list[LocatedRow]:
        """Rows at ``positions`` (ascending, distinct, each below ``num_rows()``), in that order."""
        ...


class ParquetShard:
    """A ``.parquet`` file; only the row groups that overlap the range are read.

    The file is opened per use, not held: a directory of thousands of shards must not hold thousands of handles.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._metadata: Any = None

    def _failed(self, exc: Exception) -> DataError:
        return DataError(f"{self.path}: cannot read as parquet: {exc}")

    def metadata(self) -> Any:
        """The footer: row count and row groups, read without the data."""
        if self._metadata is None:
            import pyarrow.parquet as pq  # imported here: only parquet users pay for it

            try:
                self._metadata = pq.read_metadata(self.path)
            except Exception as exc:  # pyarrow raises several types for corrupt or non-parquet files
                raise self._failed(exc) from exc
        return self._metadata

    def num_rows(self) -> int:
        return self.metadata().num_rows

    def count_rows_up_to(self, limit: int | None, cache: BlockCache | None = None) -> int:
        return self.num_rows() if limit is None else min(self.num_rows(), limit)  # the footer's count: free

    def _row_group_starts(self) -> np.ndarray:
        metadata = self.metadata()
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        return np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))[:-1]

    def _row_group(self, index: int) -> tuple[Any, int]:
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(self.path) as handle:
                table = handle.read_row_group(index)
        except Exception as exc:
            raise self._failed(exc) from exc
        return table, table.nbytes

    def rows_at(self, positions: np.ndarray, cache: BlockCache) -> list[LocatedRow]:
        starts = self._row_group_starts()
        groups = np.searchsorted(starts, positions, side="right") - 1
        out = []
        for group in np.unique(groups):  # ascending positions: each row group's rows are one run
            picked = positions[groups == group]
            table = cache.get(("parquet", self.path, int(group)), lambda: self._row_group(int(group)))
            rows = table.take(picked - starts[group]).to_pylist()
            out += [LocatedRow(f"{self.path} row {int(p) + 1}", row) for p, row in zip(picked, rows)]
        return out

    def rows(self, start: int, stop: int | None) -> Iterator[LocatedRow]:
        import pyarrow.parquet as pq

        metadata = self.metadata()
        stop = metadata.num_rows if stop is None else min(stop, metadata.num_rows)
        groups, first, offset = [], 0, 0  # overlapping row groups; the position of the first one's first row
        for index in range(metadata.num_row_groups):
            size = metadata.row_group(index).num_rows
            if offset + size > start and offset < stop:
                first = offset if not groups else first
                groups.append(index)
            offset += size
        if not groups:
            return
        try:
            with pq.ParquetFile(self.path) as handle:
                batches = handle.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups)
                yield from _rows_of_batches(self.path, batches, first, start, stop)
        except DataError:
            raise
        except Exception as exc:
            raise self._failed(exc) from exc


class ArrowShard:
    """An Arrow IPC file (``.arrow``), in the file or the stream format (``datasets`` writes streams)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._num_rows: int | None = None

    def _batches(self) -> Iterator[Any]:
        import pyarrow as pa

        try:
            with pa.memory_map(str(self.path)) as source:  # batches are views into the mapped file, not copies
                try:
                    reader = pa.ipc.open_file(source)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                except pa.ArrowInvalid:
                    source.seek(0)
                    batches = iter(pa.ipc.open_stream(source))
                yield from batches  # the consumer converts each batch to Python objects before the map closes
        except pa.ArrowException as exc:
            raise DataError(f"{self.path}: cannot read as Arrow IPC (file or stream): {exc}") from exc

    def num_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = sum(batch.num_rows for batch in self._batches())
        return self._num_rows

    def count_rows_up_to(self, limit: int | None, cache: BlockCache | None = None) -> int:
        if limit is None or self._num_rows is not None:
            return self.num_rows() if limit is None else min(self.num_rows(), limit)
        num_rows = 0
        for batch in self._batches():  # batch headers only, from the memory map; stop once past the limit
            num_rows += batch.num_rows
            if num_rows >= limit:
                return limit
        self._num_rows = num_rows
        return num_rows

    def rows(self, start: int, stop: int | None) -> Iterator[LocatedRow]:
        yield from _rows_of_batches(self.path, self._batches(), 0, start, stop)

    def _mapped_table(self) -> tuple[Any, int]:
        """The whole file as one table of views into a memory map: nothing is copied until rows are taken."""
        import pyarrow as pa

        try:
            source = pa.memory_map(str(self.path))
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowException as exc:
            raise DataError(f"{self.path}: cannot read as Arrow IPC (file or stream): {exc}") from exc
        return table, table.nbytes

    def rows_at(self, positions: np.ndarray, cache: BlockCache) -> list[LocatedRow]:
        table = cache.get(("arrow", self.path), self._mapped_table)
        rows = table.take(positions).to_pylist()
        return [LocatedRow(f"{self.path} row {int(p) + 1}", row) for p, row in zip(positions, rows)]


def _rows_of_batches(path: Path, batches: Iterator[Any], first: int, start: int,
                     stop: int | None) -> Iterator[LocatedRow]:
    """Rows ``start <= i < stop`` of record batches whose first row is at position ``first``."""
    offset = first
    for batch in batches:
        if stop is not None and offset >= stop:
            return
        low, high = max(start - offset, 0), batch.num_rows if stop is None else min(stop - offset, batch.num_rows)
        for chunk in range(low, high, _BATCH_ROWS):
            picked = batch.slice(chunk, min(_BATCH_ROWS, high - chunk)).to_pylist()
            for i, row in enumerate(picked, start=offset + chunk):
                yield LocatedRow(f"{path} row {i + 1}", row)
        offset += batch.num_rows
