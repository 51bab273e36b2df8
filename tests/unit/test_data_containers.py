"""Data containers and key paths: every container gives the jsonl original's rows (whole, sliced across shards,
counted from metadata), errors name the shard, line and key, nested keys reach into verl's layout, the data
source reaches the sample, and the prompt cursor resumes at the exact row of a sharded directory."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from helpers.data_files import KINDS, save_to_disk, verl_rows, write_container
from sluice.config.sections import DataConfig
from sluice.data import DataError, PromptSource, check_first_row, count_rows, load_prompt_samples, read_rows
from sluice.data.key_path import MissingKey, lookup

ROWS = [{"input": f"What is {i} + {i}?", "answer": {"value": str(2 * i), "style": "rule"}, "source": f"s{i % 3}"}
        for i in range(13)]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: str):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def containers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("containers")
    return {kind: write_container(kind, ROWS, root / kind.replace(".", "_")) for kind in KINDS}


# ---- containers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_container_gives_the_jsonl_rows(containers: dict[str, str], kind: str) -> None:
    assert read_rows(containers[kind]) == read_rows(containers["jsonl"]) == ROWS
    assert count_rows(containers[kind]) == len(ROWS)


@pytest.mark.parametrize("kind", ["parquet_shards", "jsonl_zst_shards", "save_to_disk", "parquet", "jsonl.gz"])
@pytest.mark.parametrize("cut", ["@[:3]", "@[2:5]", "@[3:4]", "@[4:12]", "@[-4:]", "@[5:-5]", "@[8:]", "@[-1:]"])
def test_slices_run_over_all_shards_as_one_list(containers: dict[str, str], kind: str, cut: str) -> None:
    start, stop = (int(v) if v else None for v in cut[2:-1].split(":"))
    assert read_rows(containers[kind] + cut) == ROWS[start:stop]
    assert count_rows(containers[kind] + cut) == len(ROWS[start:stop])


def test_a_slice_reads_no_shard_past_its_end(tmp_path: Path) -> None:
    directory = tmp_path / "shards"
    directory.mkdir()
    (directory / "a-0.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]))
    (directory / "a-1.jsonl").write_text("{broken\n")
    assert read_rows(f"{directory}@[1:4]") == ROWS[1:4]
    with pytest.raises(DataError, match=r"a-1\.jsonl:1: invalid JSON"):
        read_rows(f"{directory}@[1:5]")


def test_errors_name_the_shard_and_its_line_or_row(tmp_path: Path, tokenizer) -> None:
    spec = write_container("jsonl_shards", ROWS[:4] + [{"question": "x"}] + ROWS[5:], tmp_path / "j")
    with pytest.raises(DataError, match=r"train-00002-of-00005\.jsonl:1: missing key 'input' \(set by --input-key\)"):
        load_prompt_samples(spec, DataConfig(), tokenizer)
    spec = write_container("parquet_shards", [{**row, "input": None if i == 9 else row["input"]}
                                              for i, row in enumerate(ROWS)], tmp_path / "p")
    with pytest.raises(DataError, match=r"train-00003-of-00005\.parquet row 2: 'input' must be a string"):
        load_prompt_samples(spec, DataConfig(), tokenizer)


def test_directories_that_are_not_one_dataset(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty: no data files .*found: \['notes\.txt'\]"):
        read_rows(str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    write_container("parquet", ROWS, mixed)
    with pytest.raises(DataError, match=r"several kinds \['\.jsonl', '\.parquet'\]"):
        read_rows(str(mixed))
    assert read_rows(str(mixed / "*.jsonl")) == ROWS[:1]
    splits = tmp_path / "dict"
    save_to_disk(splits / "train", ROWS)
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\]; pass one split's directory"):
        read_rows(str(splits))
    assert read_rows(str(splits / "train")) == ROWS
    with pytest.raises(DataError, match=r"nothing\*\.parquet: no data files"):
        read_rows(str(tmp_path / "nothing*.parquet"))


def test_corrupt_compressed_and_empty_shards(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl.zst"
    bad.write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"bad\.jsonl\.zst: cannot read as zstd jsonl"):
        read_rows(str(bad))
    directory = tmp_path / "blank"
    directory.mkdir()
    (directory / "a.jsonl").write_text("\n")
    (directory / "b.jsonl").write_text("")
    with pytest.raises(DataError, match=r"blank: its 2 shard\(s\) have no rows"):
        read_rows(str(directory))


# ---- key paths -----------------------------------------------------------------------------------


def test_key_paths_reach_into_objects_and_lists() -> None:
    row = {"reward_model": {"ground_truth": "4", "style": "rule"}, "prompt": [{"content": "hi"}], "a.b": 1,
           "none": None}
    assert lookup(row, "reward_model.ground_truth") == "4"
    assert lookup(row, "prompt.0.content") == "hi"
    assert lookup(row, "a.b") == 1  # a literal dotted key wins
    for path, detail in [
        ("reward_model.answer", "'reward_model' has no 'answer'; keys present at 'reward_model': "
                                "['ground_truth', 'style']"),
        ("missing.x", "keys present: ['a.b', 'none', 'prompt', 'reward_model']"),
        ("prompt.2", "'prompt' is a list of 1, '2' is not an index into it"),
        ("none.x", "'none' is null, not an object"),
        ("reward_model.style.x", "'reward_model.style' is a str, not an object"),
    ]:
        with pytest.raises(MissingKey) as info:
            lookup(row, path)
        assert info.value.detail == detail


# ---- verl's layout -------------------------------------------------------------------------------


VERL = DataConfig(input_key="prompt", label_key="reward_model.ground_truth", metadata_key="extra_info",
                  apply_chat_template=True)


def test_verl_parquet_with_nested_keys_and_data_source(tmp_path: Path, tokenizer) -> None:
    rows = verl_rows(6, ("openai/gsm8k", "lighteval/MATH"))
    spec = write_container("parquet", rows, tmp_path)
    samples, report = load_prompt_samples(spec, VERL, tokenizer)
    assert report.num_kept == 6
    assert [s.label for s in samples] == ["7"] * 6
    assert samples[1].prompt == rows[1]["prompt"]
    assert samples[1].metadata["data_source"] == "lighteval/MATH"
    assert samples[1].metadata["index"] == 1 and samples[1].metadata["split"] == "train"  # extra_info's fields
    without, _ = load_prompt_samples(spec, replace(VERL, data_source_key=None), tokenizer)
    assert "data_source" not in without[0].metadata


def test_the_reported_verl_error_now_names_the_level_where_the_path_broke(tmp_path: Path, tokenizer) -> None:
    spec = write_container("parquet", verl_rows(2, ("gsm8k",)), tmp_path)
    wrong = replace(VERL, label_key="reward_model.answer")
    message = (r"prompts\.parquet row 1: missing key 'reward_model\.answer' \(set by --label-key\); 'reward_model' "
               r"has no 'answer'; keys present at 'reward_model': \['ground_truth', 'style'\]")
    with pytest.raises(DataError, match=message):
        check_first_row(spec, wrong)  # what the run checks before the tokenizer and models load
    with pytest.raises(DataError, match=message):
        load_prompt_samples(spec, wrong, tokenizer)
    check_first_row(spec, VERL)


# ---- resume over shards --------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_resumed_cursor_over_shards_continues_at_the_exact_row(containers: dict[str, str], tokenizer,
                                                                  shuffle: bool) -> None:
    config = DataConfig(label_key="answer.value", data_source_key="source")
    sharded, _ = load_prompt_samples(containers["parquet_shards"], config, tokenizer)
    original, _ = load_prompt_samples(containers["jsonl"], config, tokenizer)
    assert sharded == original
    uninterrupted = PromptSource(sharded, shuffle, seed=3)
    first = PromptSource(sharded, shuffle, seed=3)
    expected = uninterrupted.next_batch(5) + uninterrupted.next_batch(17)  # the second batch wraps an epoch
    handed_out = first.next_batch(5)
    resumed = PromptSource(load_prompt_samples(containers["parquet_shards"], config, tokenizer)[0], shuffle, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert handed_out + resumed.next_batch(17) == expected
    if not shuffle:  # unshuffled, the position is the row: the sixth row is the second of the third shard
        assert expected[5].label == ROWS[5]["answer"]["value"] and expected[5].metadata["data_source"] == "s2"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_non_utf8_line_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    # Latin-1 "é" (0xe9) on line 3, after a blank line: the line number counts the file's own lines.
    text = b'{"input": "ok"}\n\n{"input": "caf\xe9"}\n'
    path = tmp_path / f"latin1{suffix}"
    if suffix == ".jsonl.gz":
        import gzip
        text = gzip.compress(text)
    elif suffix == ".jsonl.zst":
        import pyarrow as pa
        with pa.CompressedOutputStream(str(path), "zstd") as stream:
            stream.write(text)
    if suffix != ".jsonl.zst":
        path.write_bytes(text)
    with pytest.raises(DataError, match=re.escape(f"latin1{suffix}:3: not valid UTF-8: byte 0xe9 at byte 15")):
        read_rows(str(path))
    assert read_rows(str(path) + "@[:1]") == [{"input": "ok"}]
