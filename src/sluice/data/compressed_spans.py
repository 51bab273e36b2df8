"""Reading a compressed jsonl text at any offset after one decompressing pass, without holding it whole.

A gzip or zstd stream cannot be entered in the middle: byte ``n`` of the text depends on everything before it.
The pass that indexes the lines (``line_index.LineScanner``) therefore also cuts the text into spans of about
``SPAN_BYTES`` and records, where the codec allows, a checkpoint at the start of each: the decompressor's whole
state (for gzip, a copy of zlib's inflate state, which holds its 32 KiB window) with the compressed offset to
resume from. This is the scheme of zlib's ``zran.c`` and of ``indexed_gzip``, which mature loaders use for
random access into gzip; rewriting the file (BGZF, seekable zstd) or decompressing to disk would need a copy of
the dataset, and holding the text whole is what a large dataset cannot afford.

The spans the pass decompresses are offered to the shared ``BlockCache`` as it goes, so when they fit, a whole
epoch of shuffled reads decompresses nothing more. A span evicted from the cache is decompressed again from its
checkpoint: at most one span's worth (plus the codec's input chunk) per span a batch touches, not the file.
Cached spans are keyed by their start and end, so a span cut short by a pass that stopped early (a slice's) is
never taken for the whole one.

Costs and limits: a gzip checkpoint holds about 45 KB (a 10 GB text: about 55 MB of checkpoints at 8 MiB spans).
zstd (through pyarrow's codec) offers no copy of its state, so only the start of the file is a checkpoint: an
evicted zstd span is decompressed again from the file's start. Checkpoints are not sent with a copy of the shard
(a prompt source sent to a Ray actor) since zlib states do not pickle; the copy keeps the start checkpoint, and
its reads put the others back (and cache the spans they pass) as they go.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPAN_BYTES = 8 << 20  # decompressed bytes per span: what reading one row costs at most after an eviction
_INPUT_BYTES = 64 << 10  # compressed bytes fed to the decompressor at a time
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Checkpoint:
    """Where decompression can resume."""

    compressed_offset: int  # the file offset of the next compressed byte to feed
    text_offset: int  # decompressed bytes before this point
    state: Any = None  # a zlib decompressor that has consumed the file up to compressed_offset; None: a fresh one


START = Checkpoint(0, 0)


def text_chunks(path: Path, codec: str, start: Checkpoint = START
                ) -> Iterator[tuple[bytes, Callable[[], Checkpoint | None]]]:
    """The decompressed text from ``start`` in chunks, each with a function giving the checkpoint after it
    (None where the codec cannot resume there). Raises ``OSError``/``EOFError`` as the codecs do."""
    if codec == "gzip":
        return _gzip_chunks(path, start)
    return _zstd_chunks(path, start)


def _gzip_chunks(path: Path, start: Checkpoint) -> Iterator[tuple[bytes, Callable[[], Checkpoint | None]]]:
    with path.open("rb") as handle:
        handle.seek(start.compressed_offset)
        inflate = start.state.copy() if start.state is not None else None
        position, text_offset = start.compressed_offset, start.text_offset
        while True:
            data = handle.read(_INPUT_BYTES)
            position += len(data)
            if not data:
                if inflate is not None and not inflate.eof:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return
            out = []
            while data:
                if inflate is None:  # the start of a gzip member (a file may hold several, one after another)
                    if not data.strip(b"\0"):
                        break  # zero padding after the last member, as gzip tolerates
                    if position - len(data) == 0 and not data.startswith(_GZIP_MAGIC):
                        raise OSError(f"Not a gzipped file ({data[:2]!r})")
                    inflate = zlib.decompressobj(31)
                try:
                    out.append(inflate.decompress(data))
                except zlib.error as exc:
                    raise OSError(f"corrupt gzip data: {exc}") from exc
                data = b""
                if inflate.eof:
                    data, inflate = inflate.unused_data, None
            text = b"".join(out)
            text_offset += len(text)
            yield text, _gzip_checkpoint(position, text_offset, inflate)


def _gzip_checkpoint(position: int, text_offset: int, inflate: Any) -> Callable[[], Checkpoint]:
    # The copy is taken only when asked for: copying the inflate state (its window) per input chunk would cost
    # more than the decompression.
    return lambda: Checkpoint(position, text_offset, inflate.copy() if inflate is not None else None)


def _zstd_chunks(path: Path, start: Checkpoint) -> Iterator[tuple[bytes, Callable[[], Checkpoint | None]]]:
    import pyarrow as pa  # pyarrow's zstd codec: no extra dependency for .zst

    if start.text_offset != 0:
        raise ValueError("a zstd text resumes only from its start")
    with pa.CompressedInputStream(pa.OSFile(str(path)), "zstd") as stream:
        while True:
            text = stream.read(_INPUT_BYTES * 16)
            if not text:
                return
            yield text, lambda: None


@dataclass
class Spans:
    """How one pass cut a compressed text, and where each piece can be decompressed again from."""

    starts: list[int]  # text offset of each span's first byte
    ends: list[int]  # text offset past each span's last byte (the last: where the pass stopped)
    checkpoints: list[Checkpoint | None]  # per span; None: resume from the nearest earlier one

    def span_of(self, text_offset: int) -> int:
        low, high = 0, len(self.starts)
        while high - low > 1:  # the last span starting at or before text_offset
            middle = (low + high) // 2
            low, high = (middle, high) if self.starts[middle] <= text_offset else (low, middle)
        return low

    def __getstate__(self) -> dict[str, Any]:
        # zlib states do not pickle: a copy resumes from the start of the file only.
        return {**self.__dict__, "checkpoints": [START] + [None] * (len(self.checkpoints) - 1)}


def scan_spans(path: Path, codec: str, feed: Callable[[bytes], bool], keep: Callable[[int, bytes], None]) -> Spans:
    """One decompressing pass: each chunk goes to ``feed`` (False: stop, the rest is not needed), each finished
    span to ``keep(its text offset, text)``; returns the spans with their checkpoints."""
    spans = Spans([0], [], [START])
    pieces: list[bytes] = []
    num_span_bytes = text_end = 0
    for text, checkpoint_after in text_chunks(path, codec):
        pieces.append(text)
        num_span_bytes += len(text)
        text_end += len(text)
        more = feed(text) if text else True  # an empty chunk (a gzip header) is not the end
        if num_span_bytes >= SPAN_BYTES or not more:
            keep(spans.starts[-1], b"".join(pieces))
            spans.ends.append(text_end)
            pieces, num_span_bytes = [], 0
            if not more:
                return spans
            spans.starts.append(text_end)
            spans.checkpoints.append(checkpoint_after())
    feed(b"")
    keep(spans.starts[-1], b"".join(pieces))
    spans.ends.append(text_end)
    return spans


def load_span(path: Path, codec: str, spans: Spans, index: int,
              keep: Callable[[int, bytes], None] | None = None) -> bytes:
    """The text of span ``index``, decompressed from the nearest checkpoint at or before it.

    The spans passed on the way are offered to ``keep(span index, text)`` and get back the checkpoints they lack
    (a copy of the shard lost them; the chunks fall where the indexing pass's fell, so a span start is a chunk
    end): a copy reading a file in random order decompresses it about once, not once per span it reaches. A
    codec without checkpoints (zstd) goes on to the end of the text, offering every span, for the same reason.
    """
    span = max(j for j in range(index + 1) if spans.checkpoints[j] is not None)
    resume = spans.checkpoints[span]
    to_the_end = keep is not None and codec != "gzip"
    pieces: list[bytes] = []
    found: bytes | None = None
    at = resume.text_offset
    for text, checkpoint_after in text_chunks(path, codec, resume):
        chunk_start, at = at, at + len(text)
        while span < len(spans.ends):  # this chunk's share of each span it covers
            low, high = max(spans.starts[span] - chunk_start, 0), min(spans.ends[span] - chunk_start, len(text))
            if high > low:
                pieces.append(text[low:high])
            if at < spans.ends[span]:
                break
            whole, pieces = b"".join(pieces), []
            following = span + 1
            if following < len(spans.starts) and at == spans.starts[following] \
                    and spans.checkpoints[following] is None:
                spans.checkpoints[following] = checkpoint_after()
            if span == index:
                found = whole
                if not to_the_end:
                    return found
            elif keep is not None:
                keep(span, whole)
            span = following
        if span >= len(spans.ends):
            break
    return found if found is not None else b"".join(pieces)
