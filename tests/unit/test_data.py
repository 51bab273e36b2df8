"""Prompt data: file reading and slicing, row errors, chat templating, length filter, and the prompt cursor."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from sluice.config.sections import DataConfig
from sluice.data import DataError, LoadReport, PromptSource, check_first_row, load_prompt_samples, read_rows
from sluice.types import Sample

ROWS = [
    {"input": f"What is {i} + {i}?", "label": str(2 * i), "metadata": {"id": i, "tag": "sum"}} for i in range(10)
]


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> str:
    lines = [json.dumps(row) for row in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: str):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture
def jsonl(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "prompts.jsonl", ROWS, blank_after=3)


# ---- files ---------------------------------------------------------------------------------------


def test_jsonl_skips_blank_lines_and_matches_parquet(tmp_path: Path, jsonl: str) -> None:
    parquet = write_parquet(tmp_path / "prompts.parquet", ROWS)
    assert read_rows(jsonl) == ROWS
    assert read_rows(parquet) == ROWS


@pytest.mark.parametrize("suffix, expected", [
    ("@[:3]", ROWS[:3]),
    ("@[7:]", ROWS[7:]),
    ("@[-2:]", ROWS[-2:]),
    ("@[2:-5]", ROWS[2:-5]),
    ("@[:]", ROWS),
    ("@[ 1 : 4 ]", ROWS[1:4]),
])
def test_slices_follow_python_semantics(tmp_path: Path, jsonl: str, suffix: str, expected: list) -> None:
    parquet = write_parquet(tmp_path / "prompts.parquet", ROWS)
    assert read_rows(jsonl + suffix) == expected
    assert read_rows(parquet + suffix) == expected


def test_slice_skips_parsing_lines_outside_it(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    assert read_rows(f"{path}@[:1]") == ROWS[:1]


@pytest.mark.parametrize("suffix", ["@[1]", "@[a:b]", "@[1:2:3]", "@[1:2", "@[]"])
def test_bad_slice_syntax(jsonl: str, suffix: str) -> None:
    with pytest.raises(DataError, match="bad slice"):
        read_rows(jsonl + suffix)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"input": "x",}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON") as info:
        read_rows(str(path))
    assert "column" in str(info.value)


def test_non_object_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [ROWS[0], [1, 2]])
    with pytest.raises(DataError, match=r"list\.jsonl:2: each line must be a JSON object, got list"):
        read_rows(path)


def test_empty_file_and_empty_slice(tmp_path: Path, jsonl: str) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: file has no rows"):
        read_rows(str(empty))
    with pytest.raises(DataError, match=r"slice \[5:5\] of 10 rows selects no rows"):
        read_rows(jsonl + "@[5:5]")
    parquet = write_parquet(tmp_path / "p.parquet", ROWS)
    with pytest.raises(DataError, match=r"p\.parquet: slice \[20:\] of 10 rows selects no rows"):
        read_rows(parquet + "@[20:]")


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_rows(str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown extension '\.csv'; supported: \.jsonl, \.jsonl\.gz, \.jsonl\.zst, \.parquet, \.arrow"):
        read_rows(str(csv))


# ---- prompts -------------------------------------------------------------------------------------


def config(**overrides) -> DataConfig:
    return replace(DataConfig(label_key="label"), **overrides)


def test_jsonl_and_parquet_give_the_same_samples(tmp_path: Path, jsonl: str, tokenizer) -> None:
    parquet = write_parquet(tmp_path / "prompts.parquet", ROWS)
    from_jsonl, report = load_prompt_samples(jsonl, config(), tokenizer)
    from_parquet, _ = load_prompt_samples(parquet, config(), tokenizer)
    assert from_jsonl == from_parquet
    assert report == LoadReport(num_rows=10, num_kept=10, num_dropped_too_long=0, max_prompt_len=None,
                                longest_kept_len=max(len(s.prompt_tokens) for s in from_jsonl))
    first = from_jsonl[0]
    assert first.prompt == "What is 0 + 0?" and first.label == "0"
    assert first.metadata == {"id": 0, "tag": "sum", "prompt_text": "What is 0 + 0?"}
    assert first.prompt_tokens == tokenizer.encode("What is 0 + 0?", add_special_tokens=False)
    assert ROWS[0]["metadata"] == {"id": 0, "tag": "sum"}  # the row's dict was copied, not extended


def test_missing_input_key_names_file_line_and_keys(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"question": "hi", "label": "1"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing key 'input' \(set by --input-key\); "
                                        r"keys present: \['label', 'question'\]"):
        load_prompt_samples(path, config(), tokenizer)
    samples, _ = load_prompt_samples(path + "@[:1]", config(), tokenizer)  # the bad row sliced away
    assert len(samples) == 1


def test_missing_label_key(tmp_path: Path, tokenizer) -> None:
    path = write_parquet(tmp_path / "p.parquet", [{"input": "a", "answer": "1"}, {"input": "b", "answer": "2"}])
    with pytest.raises(DataError, match=r"p\.parquet row 1: missing key 'label' \(set by --label-key\)"):
        load_prompt_samples(path, config(), tokenizer)
    samples, _ = load_prompt_samples(path, config(label_key="answer"), tokenizer)
    assert [s.label for s in samples] == ["1", "2"]
    samples, _ = load_prompt_samples(path, config(label_key=None), tokenizer)
    assert [s.label for s in samples] == [None, None]


def test_metadata_must_be_an_object(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": "a", "label": "1", "metadata": [1]}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'metadata' \(--metadata-key\) must be an object, got list"):
        load_prompt_samples(path, config(), tokenizer)


def test_chat_template_renders_and_tokenizes(jsonl: str, tokenizer) -> None:
    samples, _ = load_prompt_samples(jsonl, config(apply_chat_template=True), tokenizer)
    text = samples[3].metadata["prompt_text"]
    assert text == "<|im_start|>user\nWhat is 3 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert samples[3].prompt == "What is 3 + 3?"  # the raw prompt, not the rendered one
    assert samples[3].prompt_tokens == tokenizer.encode(text, add_special_tokens=False)
    assert samples[3].prompt_tokens.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2


def test_messages_prompt(tmp_path: Path, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"input": messages, "label": "4"}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*list of chat messages; pass --apply-chat-template"):
        load_prompt_samples(path, config(), tokenizer)
    [sample], _ = load_prompt_samples(path, config(apply_chat_template=True), tokenizer)
    assert sample.prompt == messages
    assert sample.metadata["prompt_text"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("prompt, message", [
    ([], "'input' is an empty list of chat messages"),
    (["hi"], r"'input'\[0\] must be a dict"),
    ([{"role": "user"}], r"'input'\[0\] needs a string 'content'"),
    (7, "'input' must be a string or a list of chat messages, got int"),
])
def test_invalid_prompts(tmp_path: Path, tokenizer, prompt, message: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": prompt, "label": "x"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: " + message):
        load_prompt_samples(path, config(apply_chat_template=True), tokenizer)


def test_chat_template_kwargs_reach_the_template(tmp_path: Path, tiny_checkpoint: str, jsonl: str) -> None:
    copied = tmp_path / "tok"
    copied.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(tiny_checkpoint) / name, copied / name)
    settings = json.loads((copied / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{{ messages[0]['content'] }}{% if shout is defined and shout %}!!{% endif %}"
    (copied / "tokenizer_config.json").write_text(json.dumps(settings))
    custom = AutoTokenizer.from_pretrained(str(copied))
    quiet, _ = load_prompt_samples(jsonl + "@[:1]", config(apply_chat_template=True), custom)
    loud, _ = load_prompt_samples(
        jsonl + "@[:1]", config(apply_chat_template=True, apply_chat_template_kwargs={"shout": True}), custom
    )
    assert quiet[0].metadata["prompt_text"] == "What is 0 + 0?"
    assert loud[0].metadata["prompt_text"] == "What is 0 + 0?!!"
    assert loud[0].prompt_tokens == custom.encode("What is 0 + 0?!!", add_special_tokens=False)


def test_length_filter_drops_and_reports(tmp_path: Path, tokenizer) -> None:
    rows = [{"input": "x" * n, "label": str(n)} for n in (3, 8, 5, 12, 6)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    samples, report = load_prompt_samples(path, config(rollout_max_prompt_len=6), tokenizer)
    assert [s.label for s in samples] == ["3", "5", "6"]  # exactly the limit is kept
    assert report == LoadReport(num_rows=5, num_kept=3, num_dropped_too_long=2, max_prompt_len=6, longest_kept_len=6)
    assert "dropped 2 longer than 6 tokens" in report.describe()
    with pytest.raises(DataError, match=r"all 5 prompts are longer than --rollout-max-prompt-len=2 .*shortest has 3"):
        load_prompt_samples(path, config(rollout_max_prompt_len=2), tokenizer)


# ---- prompt source -------------------------------------------------------------------------------


def pool(n: int = 7) -> list[Sample]:
    return [Sample(prompt=f"p{i}", prompt_tokens=[i]) for i in range(n)]


def names(batch: list[Sample]) -> list[str]:
    return [s.prompt for s in batch]


def test_unshuffled_keeps_file_order_and_wraps() -> None:
    source = PromptSource(pool(5), shuffle=False, seed=0)
    assert names(source.next_batch(3)) == ["p0", "p1", "p2"] and source.epoch == 0
    assert names(source.next_batch(3)) == ["p3", "p4", "p0"]
    assert source.epoch == 1 and source.num_consumed == 6 and source.num_prompts == 5
    assert names(source.next_batch(11)) == ["p1", "p2", "p3", "p4"] + [f"p{i}" for i in range(5)] + ["p0", "p1"]
    assert source.epoch == 3


def test_shuffle_is_seeded_and_covers_every_prompt_once_per_epoch() -> None:
    first = PromptSource(pool(20), shuffle=True, seed=3)
    again = PromptSource(pool(20), shuffle=True, seed=3)
    other = PromptSource(pool(20), shuffle=True, seed=4)
    epoch0, epoch1 = names(first.next_batch(20)), names(first.next_batch(20))
    assert epoch0 + epoch1 == names(again.next_batch(40))
    assert names(other.next_batch(20)) != epoch0
    assert epoch0 != epoch1 and epoch0 != [f"p{i}" for i in range(20)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"p{i}" for i in range(20))
    assert first.epoch == 2


def test_batches_are_copies() -> None:
    source = PromptSource(pool(2), shuffle=False, seed=0)
    batch = source.next_batch(2)
    batch[0].prompt_tokens.append(99)
    batch[0].metadata["x"] = 1
    assert source.next_batch(1)[0].prompt_tokens == [0] and source.next_batch(1)[0].metadata == {}


def test_state_dict_round_trip_continues_identically() -> None:
    source = PromptSource(pool(7), shuffle=True, seed=11)
    source.next_batch(10)
    state = json.loads(json.dumps(source.state_dict()))  # survives a checkpoint file
    expected = names(source.next_batch(9))
    resumed = PromptSource(pool(7), shuffle=True, seed=11)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and resumed.num_consumed == 10
    assert names(resumed.next_batch(9)) == expected
    with pytest.raises(ValueError, match=r"num_prompts: saved 7, now 6"):
        PromptSource(pool(6), shuffle=True, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed: saved 11, now 12"):
        PromptSource(pool(7), shuffle=True, seed=12).load_state_dict(state)


def test_num_rollouts_for_epochs_rounds_up() -> None:
    source = PromptSource(pool(10), shuffle=False, seed=0)
    assert source.num_rollouts_for_epochs(1, 5) == 2
    assert source.num_rollouts_for_epochs(1, 3) == 4
    assert source.num_rollouts_for_epochs(3, 4) == 8
    with pytest.raises(ValueError):
        source.num_rollouts_for_epochs(0, 4)
    with pytest.raises(ValueError, match="positive int"):
        source.next_batch(0)


@pytest.mark.parametrize(("label", "kind"), [({"value": "7"}, "object (dict)"), (["7", "seven"], "array (list)")])
def test_structured_label_with_text_reward_names_row_key_and_type(tmp_path: Path, tokenizer, label, kind) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": "a", "label": "7"}, {"input": "b", "label": label}])
    expected = (rf"p\.jsonl:2: label 'label' \(--label-key\) is a JSON {re.escape(kind)}; "
                r"--rm-type exact compares text")
    with pytest.raises(DataError, match=expected):
        load_prompt_samples(path, config(), tokenizer, text_reward="exact")
    check_first_row(path, config(), text_reward="exact")  # the first row is fine
    first_bad = write_jsonl(tmp_path / "q.jsonl", [{"input": "b", "label": label}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: label 'label'"):
        check_first_row(first_bad, config(), text_reward="exact")
    samples, _ = load_prompt_samples(path, config(), tokenizer)  # a custom reward takes any JSON label
    assert samples[1].label == label
