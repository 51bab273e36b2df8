"""How much of a jsonl file a read indexes and decompresses: one decompressing pass per compressed file for an
epoch of shuffled reads, and a slice indexes only up to its last row; rows and places as the whole-file path."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from sluice.data import DataError
from sluice.data import compressed_spans
from sluice.data.block_cache import BlockCache
from sluice.data.row_table import RowTable
from sluice.data.source import epoch_permutation

ROWS = [{"input": f"question {i} " + "x" * (i % 37), "id": i} for i in range(3000)]


def jsonl_text(rows: list[dict], blank_every: int = 0) -> bytes:
    lines = []
    for i, row in enumerate(rows):
        if blank_every and i % blank_every == 0:
            lines.append("")
        lines.append(json.dumps(row))
    return ("\n".join(lines) + "\n").encode()


def write(path: Path, text: bytes) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text))
    elif path.name.endswith(".zst"):
        import pyarrow as pa

        with pa.CompressedOutputStream(str(path), "zstd") as stream:
            stream.write(text)
    else:
        path.write_bytes(text)
    return path


@pytest.fixture
def decompressed(monkeypatch) -> dict[str, int]:
    """Counts the bytes the real codecs hand out; small spans and input chunks, so a test file has many spans
    and lines run across span ends."""
    counted = {"bytes": 0, "passes": 0}
    real = compressed_spans.text_chunks

    def counting(*args, **kwargs):
        counted["passes"] += 1
        for text, checkpoint in real(*args, **kwargs):
            counted["bytes"] += len(text)
            yield text, checkpoint

    monkeypatch.setattr(compressed_spans, "text_chunks", counting)
    monkeypatch.setattr(compressed_spans, "SPAN_BYTES", 4096)
    monkeypatch.setattr(compressed_spans, "_INPUT_BYTES", 512)
    return counted


def shuffled(n: int) -> list[int]:
    return [int(p) for p in epoch_permutation(n, seed=3, epoch=0)]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_an_epoch_of_shuffled_reads_decompresses_a_file_once(tmp_path: Path, decompressed, suffix: str) -> None:
    text = jsonl_text(ROWS)
    path = write(tmp_path / f"data{suffix}", text)
    table = RowTable(str(path))
    order = shuffled(len(ROWS))
    for begin in range(0, len(order), 256):  # an epoch in batches
        batch = order[begin:begin + 256]
        assert [located.row for located in table.rows_at(batch)] == [ROWS[p] for p in batch]
    assert decompressed == {"bytes": len(text), "passes": 1}  # it was two passes: counting, then reading


def test_an_evicted_gzip_span_is_decompressed_again_from_its_checkpoint(tmp_path: Path, decompressed) -> None:
    text = jsonl_text(ROWS)
    path = write(tmp_path / "data.jsonl.gz", text)
    table = RowTable(str(path), BlockCache(max_bytes=1))  # only the span in use is kept
    counted = decompressed["bytes"]
    assert counted == len(text)
    row = len(ROWS) - 5
    assert table.rows_at([row])[0].row == ROWS[row]
    # one span (and at most one input chunk's worth around it), not the text up to the row
    assert decompressed["bytes"] - counted < 3 * compressed_spans.SPAN_BYTES + 512 * 1100
    assert decompressed["bytes"] - counted < len(text) // 4


def test_a_copy_of_a_compressed_table_reads_the_same_rows(tmp_path: Path, decompressed) -> None:
    path = write(tmp_path / "data.jsonl.gz", jsonl_text(ROWS))
    copy = pickle.loads(pickle.dumps(RowTable(str(path))))  # zlib states stay behind: it resumes from the start
    assert [located.row for located in copy.rows_at([2999, 7, 1500])] == [ROWS[2999], ROWS[7], ROWS[1500]]


def test_gzip_members_one_after_another_are_one_text(tmp_path: Path, decompressed) -> None:
    path = tmp_path / "joined.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_text(ROWS[:1000])) + gzip.compress(jsonl_text(ROWS[1000:])))
    table = RowTable(str(path), BlockCache(max_bytes=1))
    order = shuffled(len(ROWS))[:300]
    assert [located.row for located in table.rows_at(order)] == [ROWS[p] for p in order]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_a_bad_row_is_named_by_its_line_wherever_it_is_read(tmp_path: Path, decompressed, suffix: str) -> None:
    lines = jsonl_text(ROWS, blank_every=100).decode().split("\n")
    lines[2500] = '{"input": "cut'
    path = write(tmp_path / f"bad{suffix}", "\n".join(lines).encode())
    table = RowTable(str(path), BlockCache(max_bytes=1))
    row = 2500 - 25  # the rows before line 2501: one blank line per 100 rows
    with pytest.raises(DataError, match=rf"bad{suffix.replace('.', '[.]')}:2501: invalid JSON"):
        table.rows_at([3, row])


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_a_slice_indexes_only_up_to_its_last_row(tmp_path: Path, decompressed, suffix: str) -> None:
    text = jsonl_text(ROWS, blank_every=7)
    path = write(tmp_path / f"data{suffix}", text)
    sliced = RowTable(f"{path}@[10:110]")
    shard = sliced.shards[0]
    assert shard._index.num_rows == 110 and not shard._index_complete
    if suffix != ".jsonl":
        assert decompressed["bytes"] < len(text) // 5  # the pass stopped after row 110
    whole = RowTable(str(path))
    order = shuffled(100)
    got = sliced.rows_at(order)
    expected = whole.rows_at([p + 10 for p in order])
    assert [(r.where, r.row) for r in got] == [(r.where, r.row) for r in expected]
    assert shard.num_rows() == len(ROWS)  # the whole count, when asked for, indexes to the end


def test_a_slice_over_shards_indexes_only_the_shard_it_ends_in_up_to_its_end(tmp_path: Path) -> None:
    directory = tmp_path / "shards"
    directory.mkdir()
    for i in range(3):
        write(directory / f"part-{i}.jsonl", jsonl_text(ROWS[i * 1000:(i + 1) * 1000]))
    table = RowTable(f"{directory}@[990:1020]")
    assert [shard._index.num_rows for shard in table.shards] == [1000, 20]
    assert [located.row for located in table.rows_at(list(range(30)))] == ROWS[990:1020]
    assert np.array_equal(table._shard_starts, [0, 1000])


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_copy_reading_in_random_order_decompresses_about_once(tmp_path: Path, decompressed, suffix: str) -> None:
    """A copy (a prompt source sent to a Ray actor) has lost the checkpoints and the cache: its reads put the
    checkpoints back and cache the spans they pass, so a shuffled epoch costs about one pass, not one per span."""
    text = jsonl_text(ROWS)
    path = write(tmp_path / f"data{suffix}", text)
    copy = pickle.loads(pickle.dumps(RowTable(str(path))))
    counted = decompressed["bytes"]
    order = shuffled(len(ROWS))
    for begin in range(0, len(order), 256):
        batch = order[begin:begin + 256]
        assert [located.row for located in copy.rows_at(batch)] == [ROWS[p] for p in batch]
    assert len(text) // 4096 > 20  # many spans: one pass per span would cost about ten texts
    assert decompressed["bytes"] - counted <= 1.1 * len(text)


def test_a_span_cut_short_by_a_slice_is_not_taken_for_the_whole_one(tmp_path: Path, decompressed) -> None:
    """An index that stopped at a slice's last row cached a short last span; a longer pass sharing the cache
    must not read that span as the whole one."""
    path = write(tmp_path / "data.jsonl.gz", jsonl_text(ROWS))
    cache = BlockCache()
    shard = RowTable(str(path) + "@[:10]", cache)
    assert [located.row for located in shard.rows_at([3, 9])] == [ROWS[3], ROWS[9]]
    whole = RowTable(str(path), cache)
    assert [located.row for located in whole.rows_at([2999, 50, 1500])] == [ROWS[2999], ROWS[50], ROWS[1500]]
