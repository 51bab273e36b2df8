"""A jsonl shard: ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` (see ``shards.py`` for the ``Shard`` contract).

Lines are read as bytes and decoded one at a time, so a decoding error names its line. A plain file is counted
by building its line index (``line_index.py``), which then serves reads at any row with one seek each. A
compressed file cannot be entered in the middle: reading rows at scattered positions decompresses it whole, as
one block of the shared ``BlockCache``.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from sluice.data.block_cache import BlockCache
from sluice.data.line_index import LineIndex, index_lines
from sluice.data.rows import DataError, LocatedRow


class JsonlShard:
    """A ``.jsonl`` file, plain or compressed (``.jsonl.gz``, ``.jsonl.zst``)."""

    def __init__(self, path: Path, codec: str | None) -> None:
        self.path, self.codec = path, codec
        self._num_rows: int | None = None
        self._index: LineIndex | None = None  # plain files only: a compressed file cannot be seeked into

    def _open(self) -> IO[bytes]:
        # Bytes, decoded line by line: a text stream decodes ahead in chunks, so its error could not name the line.
        if self.codec is None:
            return self.path.open("rb")
        if self.codec == "gzip":
            return gzip.open(self.path, "rb")
        import pyarrow as pa  # pyarrow's zstd codec: no extra dependency for .zst

        return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(self.path)), "zstd"))

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, bytes) of the non-blank lines; decompression errors name the file."""
        try:
            with self._open() as handle:
                for number, raw in enumerate(handle, start=1):
                    if raw.strip():
                        yield number, raw
        except (OSError, EOFError) as exc:  # pyarrow's codec errors are OSErrors
            raise DataError(f"{self.path}: cannot read as {self.codec or 'utf-8'} jsonl: {exc}") from exc

    def num_rows(self) -> int:
        if self.codec is None:
            return self.index().num_rows
        if self._num_rows is None:
            self._num_rows = sum(1 for _ in self._lines())
        return self._num_rows

    def index(self) -> LineIndex:
        """The line index of a plain file, built once by one pass over it."""
        if self._index is None:
            try:
                with self.path.open("rb") as handle:
                    self._index = index_lines(handle)
            except OSError as exc:
                raise DataError(f"{self.path}: cannot read: {exc}") from exc
        return self._index

    def _decompressed(self) -> tuple[tuple[bytes, LineIndex], int]:
        """The whole decompressed text of a compressed file and its line index, as a cache block."""
        try:
            with self._open() as handle:
                text = handle.read()
        except (OSError, EOFError) as exc:
            raise DataError(f"{self.path}: cannot read as {self.codec} jsonl: {exc}") from exc
        index = index_lines(io.BytesIO(text))
        self._num_rows = index.num_rows
        return (text, index), len(text) + index.offsets.nbytes

    def rows_at(self, positions: np.ndarray, cache: BlockCache) -> list[LocatedRow]:
        if self.codec is None:
            index = self.index()
            try:
                with self.path.open("rb") as handle:
                    raws = [_line_at(handle, int(index.offsets[p])) for p in positions]
            except OSError as exc:
                raise DataError(f"{self.path}: cannot read: {exc}") from exc
        else:
            text, index = cache.get(("jsonl", self.path), self._decompressed)
            raws = [_line_in(text, int(start)) for start in index.offsets[positions]]
        out = []
        for position, raw in zip(positions, raws):
            where = f"{self.path}:{index.line_of(int(position))}"
            out.append(LocatedRow(where, _parse_line(where, _decode(where, raw))))
        return out

    def rows(self, start: int, stop: int | None) -> Iterator[LocatedRow]:
        position = -1
        for position, (number, raw) in enumerate(self._lines()):
            if stop is not None and position >= stop:
                return
            if position >= start:  # lines before the range are not decoded or parsed at all
                where = f"{self.path}:{number}"
                yield LocatedRow(where, _parse_line(where, _decode(where, raw)))
        self._num_rows = position + 1  # read to the end: the count comes for free


def _line_at(handle: IO[bytes], offset: int) -> bytes:
    handle.seek(offset)
    return handle.readline()


def _line_in(text: bytes, start: int) -> bytes:
    end = text.find(b"\n", start)
    return text[start:] if end < 0 else text[start:end]


def _decode(where: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line "
                        f"({exc.reason}); re-encode the file as UTF-8, e.g. iconv -f <its encoding> -t utf-8") from exc


class _NotJson(ValueError):
    """What Python's json module accepts but JSON is not: NaN/Infinity, a key given twice (the last would win)."""


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value (write null, a number or a string)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _NotJson(f"key {twice!r} appears twice in one object (only the last would be kept)")
    return obj


def _parse_line(where: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except _NotJson as exc:
        raise DataError(f"{where}: invalid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(value).__name__}")
    return value
