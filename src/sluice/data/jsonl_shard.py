"""A jsonl shard: ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` (see ``shards.py`` for the ``Shard`` contract).

Lines are read as bytes and decoded one at a time, so a decoding error names its line. A file is counted by
building its line index (``line_index.py``), only up to the last row a slice needs. A plain file then serves
reads at any row with one seek each. A compressed file cannot be entered in the middle, so the same pass records
spans of its text with checkpoints to resume at (``compressed_spans.py``) and offers the spans to the shared
``BlockCache``: rows at scattered positions are read from cached spans, and a span evicted is decompressed again
from its checkpoint, never the whole file into memory.

Why checkpoints rather than building the index lazily while rows are read: shuffled order needs the row count
and every row's offset before the first batch, so the first pass has to reach the end (or the slice's last row)
anyway; keeping what it decompressed and where it can resume makes that pass the only one.
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
from sluice.data.compressed_spans import Spans, load_span, scan_spans
from sluice.data.line_index import LineIndex, LineScanner, index_lines
from sluice.data.rows import DataError, LocatedRow


class JsonlShard:
    """A ``.jsonl`` file, plain or compressed (``.jsonl.gz``, ``.jsonl.zst``)."""

    def __init__(self, path: Path, codec: str | None) -> None:
        self.path, self.codec = path, codec
        self._num_rows: int | None = None  # known once a pass reached the end of the file
        self._index: LineIndex | None = None  # of the first _index.num_rows rows, or of all once complete
        self._index_complete = False
        self._spans: Spans | None = None  # compressed files: where the index's pass can be resumed

    def _open(self) -> IO[bytes]:
        # Bytes, decoded line by line: a text stream decodes ahead in chunks, so its error could not name the line.
        if self.codec is None:
            return self.path.open("rb")
        if self.codec == "gzip":
            return gzip.open(self.path, "rb")
        import pyarrow as pa  # pyarrow's zstd codec: no extra dependency for .zst

        return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(self.path)), "zstd"))

    def _failed(self, exc: Exception) -> DataError:
        return DataError(f"{self.path}: cannot read as {self.codec or 'utf-8'} jsonl: {exc}")

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, bytes) of the non-blank lines; decompression errors name the file."""
        try:
            with self._open() as handle:
                for number, raw in enumerate(handle, start=1):
                    if raw.strip():
                        yield number, raw
        except (OSError, EOFError) as exc:  # pyarrow's codec errors are OSErrors
            raise self._failed(exc) from exc

    def num_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = self.index().num_rows
        return self._num_rows

    def count_rows_up_to(self, limit: int | None, cache: BlockCache | None = None) -> int:
        """``min(num_rows(), limit)``, indexing only the first ``limit`` rows; ``cache`` keeps the spans of a
        compressed file decompressed on the way."""
        if self._num_rows is not None and (limit is None or self._index_complete):
            return self._num_rows if limit is None else min(self._num_rows, limit)
        return self.index(limit, cache).num_rows

    def index(self, num_rows_wanted: int | None = None, cache: BlockCache | None = None) -> LineIndex:
        """The line index of the first ``num_rows_wanted`` rows (None: all), built by one pass that stops there."""
        if self._index is not None and (self._index_complete or (
                num_rows_wanted is not None and self._index.num_rows >= num_rows_wanted)):
            return self._index
        try:
            if self.codec is None:
                with self.path.open("rb") as handle:
                    self._index = index_lines(handle, num_rows_wanted=num_rows_wanted)
            else:
                scanner = LineScanner(num_rows_wanted)
                keep = (lambda start, text: cache.get(("jsonl", self.path, start, start + len(text)),
                                                      lambda: (text, len(text)))) if cache else (lambda start, text: None)
                self._spans = scan_spans(self.path, self.codec, lambda text: scanner.feed(text, final=not text), keep)
                self._index = scanner.finish()
        except (OSError, EOFError) as exc:
            raise self._failed(exc) from exc
        # Fewer rows than wanted: the pass reached the end. Exactly as many: there may be more.
        self._index_complete = num_rows_wanted is None or self._index.num_rows < num_rows_wanted
        if self._index_complete:
            self._num_rows = self._index.num_rows
        return self._index

    def _span_key(self, span: int) -> tuple[str, Path, int, int]:
        """A span's cache key: its text range, so a span cut short by an earlier pass is a different block."""
        return ("jsonl", self.path, self._spans.starts[span], self._spans.ends[span])

    def _span_text(self, span: int, cache: BlockCache) -> bytes:
        def keep(passed: int, text: bytes) -> None:  # spans decompressed on the way: cached too
            cache.get(self._span_key(passed), lambda: (text, len(text)))

        def load() -> tuple[bytes, int]:
            try:
                text = load_span(self.path, self.codec, self._spans, span, keep)
            except (OSError, EOFError) as exc:
                raise self._failed(exc) from exc
            return text, len(text)

        return cache.get(self._span_key(span), load)

    def _compressed_line(self, offset: int, cache: BlockCache) -> bytes:
        """The line starting at text ``offset``, read from the spans (a line may run on into the next ones)."""
        span = self._spans.span_of(offset)
        text, start = self._span_text(span, cache), offset - self._spans.starts[span]
        end = text.find(b"\n", start)  # found in place: slicing a span per row would copy megabytes per row
        if end >= 0:
            return text[start:end]
        pieces = [text[start:]]
        while span + 1 < len(self._spans.ends):
            span += 1
            text = self._span_text(span, cache)
            end = text.find(b"\n")
            pieces.append(text if end < 0 else text[:end])
            if end >= 0:
                break
        return b"".join(pieces)

    def rows_at(self, positions: np.ndarray, cache: BlockCache) -> list[LocatedRow]:
        index = self.index(int(positions.max()) + 1 if len(positions) else 0, cache)
        if self.codec is None:
            try:
                with self.path.open("rb") as handle:
                    raws = [_line_at(handle, int(index.offsets[p])) for p in positions]
            except OSError as exc:
                raise DataError(f"{self.path}: cannot read: {exc}") from exc
        else:
            raws = [self._compressed_line(int(index.offsets[p]), cache) for p in positions]
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
