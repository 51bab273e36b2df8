"""Where each row of a jsonl text starts: the byte offsets of its non-blank lines, found in one pass.

The pass reads the bytes in chunks and finds newlines and blank lines with numpy, without decoding or parsing
JSON, so indexing a file costs about as much as reading it; the index then holds 8 bytes per row, and any row
is read with one seek. Blank lines (whitespace only, as ``bytes.strip`` sees it) are not rows, but error
messages name a row by its line in the file, so the index also keeps, for each blank line, how many rows came
before it (a short array: blank lines are rare).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO

import numpy as np

_CHUNK_BYTES = 4 << 20  # bytes scanned at a time: bounds the scan's temporary arrays (~10 bytes per byte read)
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip() removes


@dataclass(frozen=True)
class LineIndex:
    """The rows of one jsonl text."""

    offsets: np.ndarray  # int64 [num_rows]: byte offset of each row's line in the (decompressed) text
    rows_before_blank: np.ndarray  # int64 [num_blank_lines]: rows before each blank line, nondecreasing

    @property
    def num_rows(self) -> int:
        return len(self.offsets)

    def line_of(self, row: int) -> int:
        """The 1-based line number of row ``row`` (0-based), counting blank lines as the file does."""
        return row + 1 + int(np.searchsorted(self.rows_before_blank, row, side="right"))


def _scan_lines(data: bytes, base: int, num_rows_before: int, final: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Row offsets and blank lines among the complete lines of ``data`` (a text that starts at byte ``base``);
    with ``final`` a last line without a newline counts too. Returns them and the bytes consumed."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    if final and (not len(ends) or ends[-1] != len(buf) - 1) and len(buf):
        ends = np.append(ends, len(buf))
    if not len(ends):
        return np.empty(0, np.int64), np.empty(0, np.int64), 0
    starts = np.concatenate(([0], ends[:-1] + 1))
    text_bytes = np.concatenate(([0], np.cumsum(~_WHITESPACE[buf], dtype=np.int64)))
    is_row = text_bytes[ends] > text_bytes[starts]
    rows_before_line = num_rows_before + np.cumsum(is_row) - is_row
    consumed = min(int(ends[-1]) + 1, len(buf))
    return base + starts[is_row], rows_before_line[~is_row], consumed


class LineScanner:
    """Builds a ``LineIndex`` from a text fed in chunks, so a pass that decompresses a file can index it on the way.

    ``feed`` returns False once ``num_rows_wanted`` rows are indexed: a reader that needs only the first rows
    (a slice) stops there instead of indexing the whole file.
    """

    def __init__(self, num_rows_wanted: int | None = None) -> None:
        self.num_rows_wanted = num_rows_wanted
        self.num_rows = 0
        self._offsets: list[np.ndarray] = []
        self._blanks: list[np.ndarray] = []
        self._carry, self._base = b"", 0
        self._done = False

    def feed(self, chunk: bytes, final: bool = False) -> bool:
        """Scan ``chunk`` (empty and ``final``: the text ended); False once enough rows are indexed."""
        data = self._carry + chunk if self._carry else chunk
        row_offsets, blank, consumed = _scan_lines(data, self._base, self.num_rows, final=final)
        wanted = self.num_rows_wanted
        stopped = wanted is not None and self.num_rows + len(row_offsets) >= wanted
        if stopped:
            row_offsets = row_offsets[:wanted - self.num_rows]
            blank = blank[blank < wanted]  # blank lines past the last wanted row do not move its line number
        self._offsets.append(row_offsets)
        self._blanks.append(blank)
        self.num_rows += len(row_offsets)
        self._base, self._carry = self._base + consumed, data[consumed:]
        self._done = final or stopped
        return not self._done

    def finish(self) -> LineIndex:
        if not self._done:
            self.feed(b"", final=True)
        return LineIndex(np.concatenate(self._offsets or [np.empty(0)]).astype(np.int64),
                         np.concatenate(self._blanks or [np.empty(0)]).astype(np.int64))


def index_lines(handle: IO[bytes], chunk_bytes: int = _CHUNK_BYTES, num_rows_wanted: int | None = None) -> LineIndex:
    """Index the text ``handle`` reads from its current position (offsets relative to that position), to its end
    or until ``num_rows_wanted`` rows are indexed."""
    scanner = LineScanner(num_rows_wanted)
    while True:
        chunk = handle.read(chunk_bytes)
        if not scanner.feed(chunk, final=not chunk) or not chunk:
            return scanner.finish()
