"""Streamed training prompts: rows read at shuffled positions from every container, converted when drawn, a
bounded cache, errors at the drawn row, and an exact resume over shards."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from helpers.data_files import KINDS, write_container
from sluice.config.sections import DataConfig
from sluice.data import DataError, PromptSource, load_prompt_samples, load_prompt_table
from sluice.data.block_cache import BlockCache
from sluice.data.line_index import index_lines
from sluice.data.row_table import RowTable
from sluice.data.source import epoch_permutation

ROWS = [{"input": f"What is {i} + {i}?", "answer": {"value": str(2 * i)}, "source": f"s{i % 3}"} for i in range(13)]
CONFIG = DataConfig(label_key="answer.value", data_source_key="source")
STREAM = {"eager_max_rows": 0}  # every selection streams


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: str):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def containers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("containers")
    return {kind: write_container(kind, ROWS, root / kind.replace(".", "_")) for kind in KINDS}


def labels(batch) -> list[str]:
    return [sample.label for sample in batch]


# ---- line index ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 4096])
def test_line_index_matches_python_lines(chunk_bytes: int) -> None:
    text = b'{"a": 1}\n\n  \t\n{"a": 22}\r\n\r\n{"a": 333}\n \n{"a": 4}'  # blank lines, CRLF, no final newline
    index = index_lines(io.BytesIO(text), chunk_bytes=chunk_bytes)
    lines = text.split(b"\n")
    starts = [sum(len(line) + 1 for line in lines[:i]) for i in range(len(lines))]
    expected = [(starts[i], i + 1) for i, line in enumerate(lines) if line.strip()]
    assert [(int(index.offsets[r]), index.line_of(r)) for r in range(index.num_rows)] == expected
    assert index.num_rows == 4


# ---- rows at positions ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_container_streams_the_jsonl_samples_in_the_same_shuffled_order(containers: dict[str, str], tokenizer,
                                                                              kind: str) -> None:
    original, _ = load_prompt_samples(containers["jsonl"], CONFIG, tokenizer)
    table, report = load_prompt_table(containers[kind], CONFIG, tokenizer, **STREAM)
    assert report is None and table.num_converted == 0
    streamed = PromptSource(table, shuffle=True, seed=5).next_batch(2 * len(ROWS) + 3)
    in_memory = PromptSource(original, shuffle=True, seed=5).next_batch(2 * len(ROWS) + 3)
    assert streamed == in_memory
    assert sorted(labels(streamed[:len(ROWS)])) == sorted(row["answer"]["value"] for row in ROWS)


@pytest.mark.parametrize("kind", ["parquet_shards", "jsonl_zst_shards", "save_to_disk", "jsonl"])
def test_a_streamed_slice_is_the_slice_of_the_rows(containers: dict[str, str], tokenizer, kind: str) -> None:
    table, _ = load_prompt_table(containers[kind] + "@[2:-3]", CONFIG, tokenizer, **STREAM)
    assert table.num_rows == len(ROWS[2:-3])
    batch = PromptSource(table, shuffle=False, seed=0).next_batch(table.num_rows + 1)
    assert labels(batch) == [row["answer"]["value"] for row in ROWS[2:-3] + ROWS[2:3]]


def test_a_streamed_slice_opens_no_shard_past_its_end(tmp_path: Path, tokenizer) -> None:
    directory = tmp_path / "shards"
    directory.mkdir()
    (directory / "a-0.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]))
    (directory / "a-1.jsonl").write_bytes(b"\xff\xfe not even text\n")
    table, _ = load_prompt_table(f"{directory}@[1:4]", CONFIG, tokenizer, **STREAM)
    assert len(table.rows.shards) == 1
    assert labels(PromptSource(table, shuffle=False, seed=0).next_batch(3)) == ["2", "4", "6"]
    with pytest.raises(DataError, match=r"a-1\.jsonl:1: not valid UTF-8"):
        PromptSource(load_prompt_table(f"{directory}@[3:5]", CONFIG, tokenizer, **STREAM)[0], False, 0).next_batch(2)


def test_block_cache_keeps_within_its_bound_and_reloads_evicted_blocks(tmp_path: Path) -> None:
    spec = write_container("parquet_shards", ROWS, tmp_path)  # row groups of 2 rows: 8 blocks
    cache = BlockCache(max_bytes=1)  # only the block in use
    table = RowTable(spec, cache)
    order = [int(p) for p in epoch_permutation(len(ROWS), seed=1, epoch=0)]
    assert [located.row for located in table.rows_at(order)] == [ROWS[p] for p in order]
    loads = cache.num_loads
    assert len(cache._blocks) == 1 and loads == 8  # each row group read once per call, in ascending order
    table.rows_at(order)
    assert cache.num_loads == 2 * loads and cache.num_bytes == cache._blocks[next(iter(cache._blocks))][1]
    roomy = BlockCache()
    RowTable(spec, roomy).rows_at(order)
    RowTable(spec, roomy).rows_at(order)
    assert roomy.num_loads == 8


# ---- conversion when drawn -----------------------------------------------------------------------


class CountingTokenizer:
    """The real tokenizer, counting the texts it encodes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.num_encoded = tokenizer, 0

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def encode(self, text: str, **kwargs) -> list[int]:
        self.num_encoded += 1
        return self.tokenizer.encode(text, **kwargs)

    def __getattr__(self, name: str):  # the rest (decode, backend_tokenizer, ...) is the real tokenizer's
        return getattr(self.tokenizer, name)


def test_a_large_file_is_not_tokenized_up_front(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "large.jsonl"
    path.write_text("".join(f'{{"input": "{i}+{i}", "label": "{2 * i}"}}\n' for i in range(200_000)))
    counting = CountingTokenizer(tokenizer)
    table, report = load_prompt_table(str(path), DataConfig(label_key="label"), counting)
    source = PromptSource(table, shuffle=True, seed=0)
    batch = source.next_batch(64)
    assert report is None and table.num_rows == 200_000
    assert counting.num_encoded == 64 == table.num_converted  # the batch's prompts only
    assert all(int(s.label) == 2 * int(s.prompt.split("+")[0]) for s in batch)
    source.next_batch(64)
    assert counting.num_encoded == 128


def test_a_small_file_is_converted_and_checked_whole_at_load(tmp_path: Path, tokenizer) -> None:
    path = write_container("jsonl", ROWS[:4] + [{"question": "x"}] + ROWS[5:], tmp_path)
    with pytest.raises(DataError, match=r"prompts\.jsonl:5: missing key 'input'"):
        load_prompt_table(path, CONFIG, tokenizer)  # below the row threshold: the bad row fails at start
    counting = CountingTokenizer(tokenizer)
    table, report = load_prompt_table(path + "@[:4]", CONFIG, counting)
    assert report is not None and report.num_kept == 4 and counting.num_encoded == 4
    PromptSource(table, shuffle=True, seed=0).next_batch(10)
    assert counting.num_encoded == 4  # every sample kept: nothing is tokenized twice


MISSING_LABEL = (r": missing key 'answer\.value' \(set by --label-key\); 'answer' has no 'value'; "
                 r"keys present at 'answer': \['val'\]")


# The 6th row is the second row of the third shard (shards of 3, 1, 4, ... rows). Parquet gives every row all the
# columns of the file (a missing nested key reads as null), so its bad row is a null prompt instead.
@pytest.mark.parametrize("kind, bad_row, expected", [
    ("jsonl_shards", {**ROWS[5], "answer": {"val": "10"}}, r"train-00002-of-00005\.jsonl:2" + MISSING_LABEL),
    ("parquet_shards", {**ROWS[5], "input": None},
     r"train-00002-of-00005\.parquet row 2: 'input' must be a string or a list of chat messages, got NoneType"),
])
def test_a_streamed_bad_row_is_reported_when_drawn_naming_shard_row_and_key(tmp_path: Path, tokenizer, kind: str,
                                                                          bad_row: dict, expected: str) -> None:
    spec = write_container(kind, ROWS[:5] + [bad_row] + ROWS[6:], tmp_path)
    table, _ = load_prompt_table(spec, CONFIG, tokenizer, **STREAM)  # no error yet: the 6th row is not read
    source = PromptSource(table, shuffle=False, seed=0)
    assert labels(source.next_batch(5)) == [row["answer"]["value"] for row in ROWS[:5]]
    with pytest.raises(DataError, match=expected):
        source.next_batch(3)


def test_streamed_prompts_over_the_length_limit_are_skipped_when_drawn(tmp_path: Path, tokenizer) -> None:
    rows = [{"input": "x" * n, "label": str(n)} for n in (3, 8, 5, 12, 6)]
    spec = write_container("jsonl", rows, tmp_path)
    table, _ = load_prompt_table(spec, DataConfig(label_key="label", rollout_max_prompt_len=6), tokenizer, **STREAM)
    source = PromptSource(table, shuffle=False, seed=0)
    assert labels(source.next_batch(4)) == ["3", "5", "6", "3"]
    assert source.num_consumed == 6 and table.num_dropped_too_long == 2  # two positions consumed and skipped
    too_short, _ = load_prompt_table(spec, DataConfig(label_key="label", rollout_max_prompt_len=2), tokenizer,
                                     **STREAM)
    with pytest.raises(DataError, match=r"a whole epoch of 5 rows drawn, and every prompt was longer than "
                                        r"--rollout-max-prompt-len=2"):
        PromptSource(too_short, shuffle=True, seed=0).next_batch(1)


def test_the_converted_samples_held_are_bounded(tmp_path: Path, tokenizer) -> None:
    spec = write_container("parquet", ROWS, tmp_path)
    table, _ = load_prompt_table(spec, CONFIG, tokenizer, **STREAM)
    table.cache_size = 4
    source = PromptSource(table, shuffle=True, seed=2)
    first_epoch = source.next_batch(len(ROWS))
    assert len(table._cache) == 4 and table.num_converted == len(ROWS)
    second_epoch = source.next_batch(len(ROWS))
    assert sorted(labels(first_epoch)) == sorted(labels(second_epoch))
    assert len(ROWS) + len(ROWS) - 4 <= table.num_converted <= 2 * len(ROWS)


# ---- resume --------------------------------------------------------------------------------------


def test_a_resumed_streamed_run_over_shards_continues_at_the_exact_row_with_shuffling(containers: dict[str, str],
                                                                                     tokenizer) -> None:
    spec = containers["parquet_shards"]
    uninterrupted = PromptSource(load_prompt_table(spec, CONFIG, tokenizer, **STREAM)[0], shuffle=True, seed=3)
    expected = uninterrupted.next_batch(9) + uninterrupted.next_batch(15)  # the second batch wraps an epoch
    first = PromptSource(load_prompt_table(spec, CONFIG, tokenizer, **STREAM)[0], shuffle=True, seed=3)
    handed_out = first.next_batch(9)  # stopped mid-epoch
    resumed = PromptSource(load_prompt_table(spec, CONFIG, tokenizer, **STREAM)[0], shuffle=True, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = resumed.next_batch(15)
    assert handed_out + rest == expected
    # The tenth prompt is the row the epoch-0 permutation puts tenth; then epoch 1's order begins.
    order = [int(p) for epoch in (0, 1) for p in epoch_permutation(len(ROWS), 3, epoch)]
    assert labels(rest) == [ROWS[p]["answer"]["value"] for p in order[9:24]]
    assert resumed.epoch == 1 and resumed.num_consumed == 24


@pytest.mark.parametrize("kind", ["parquet_shards", "jsonl", "jsonl_zst_shards", "save_to_disk"])
def test_a_streamed_source_sent_to_another_process_continues_identically(containers: dict[str, str], tokenizer,
                                                                         kind: str) -> None:
    # With --orchestrator ray the prompt source is pickled into the buffer actor.
    source = PromptSource(load_prompt_table(containers[kind], CONFIG, tokenizer, **STREAM)[0], shuffle=True, seed=4)
    source.next_batch(5)
    sent = pickle.loads(pickle.dumps(source))
    assert sent._prompts.rows.cache.num_bytes == 0  # decoded blocks are not sent
    assert sent.next_batch(20) == source.next_batch(20)


def test_a_cursor_saved_before_the_row_order_changed(tokenizer, containers: dict[str, str]) -> None:
    table, _ = load_prompt_table(containers["jsonl"], CONFIG, tokenizer)
    old = {"version": 1, "num_consumed": 4, "epoch": 0, "num_prompts": len(ROWS), "shuffle": False, "seed": 1}
    source = PromptSource(table, shuffle=False, seed=1)
    source.load_state_dict(old)  # unshuffled, nothing dropped: position 4 is the same row as it was
    assert labels(source.next_batch(1)) == [ROWS[4]["answer"]["value"]]
    with pytest.raises(ValueError, match=re.escape("saved by an earlier sluice whose shuffled order")):
        PromptSource(table, shuffle=True, seed=1).load_state_dict({**old, "shuffle": True})
