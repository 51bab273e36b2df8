"""Per-prompt checks at load time: the length limit (an error from the context, a logged drop from the flag) and
characters the tokenizer cannot represent, with real tokenizers built here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers.data_files import write_container
from helpers.tokenizers import printable_ascii_tokenizer
from sluice.config.sections import DataConfig
from sluice.data import DataError, load_prompt_samples
from sluice.data.prompt_checks import CharacterCheck, PromptLimit, can_lose_characters, describe_characters

CONTEXT_LIMIT = PromptLimit(10, "the model's context of 12 tokens (test) minus --rollout-max-response-len 2",
                            drops_longer=False)


@pytest.fixture(scope="module")
def tokenizer():
    """A character tokenizer: printable ASCII only, no byte fallback, no unknown token."""
    return printable_ascii_tokenizer()


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's scheme: every byte is a token, so no character can be lost."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words from a tiny vocabulary; anything else becomes [UNK]."""
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "what": 1, "is": 2, "3": 3, "2": 4, "?": 5},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def data(**overrides) -> DataConfig:
    return replace(DataConfig(label_key="label"), **overrides)


def rows_of(prompts: list[str]) -> list[dict]:
    return [{"input": text, "label": str(i)} for i, text in enumerate(prompts)]


def test_a_prompt_over_the_context_limit_names_its_line_and_lengths(tmp_path: Path, tokenizer) -> None:
    spec = write_container("jsonl", rows_of(["short", "x" * 11, "ok"]), tmp_path)
    with pytest.raises(DataError) as info:
        load_prompt_samples(spec, data(), tokenizer, context_limit=CONTEXT_LIMIT)
    message = str(info.value)
    assert message.startswith(f"{spec}:2: the prompt is 11 tokens, over the 10 a prompt may take (the model's "
                              "context of 12 tokens (test) minus --rollout-max-response-len 2)")
    assert "--rollout-max-prompt-len" in message
    samples, report = load_prompt_samples(spec, data(), tokenizer,
                                          context_limit=replace(CONTEXT_LIMIT, max_len=11))  # exactly fits
    assert len(samples) == 3 and report.num_dropped_too_long == 0


def test_the_limit_names_the_shard_of_a_directory(tmp_path: Path, tokenizer) -> None:
    prompts = ["p"] * 5 + ["y" * 20] + ["q"] * 4  # row 6: the third shard's second row (shards of 3, 1, 4, 2)
    spec = write_container("parquet_shards", rows_of(prompts), tmp_path)
    with pytest.raises(DataError, match=r"train-00002-of-00004\.parquet row 2: the prompt is 20 tokens"):
        load_prompt_samples(spec, data(), tokenizer, context_limit=CONTEXT_LIMIT)


def test_the_flag_drops_longer_prompts_and_reports_the_count(tmp_path: Path, tokenizer) -> None:
    spec = write_container("jsonl", rows_of(["short", "x" * 11, "y" * 30]), tmp_path)
    samples, report = load_prompt_samples(spec, data(rollout_max_prompt_len=20), tokenizer,
                                          context_limit=CONTEXT_LIMIT)  # the flag replaces the context's limit
    assert [s.label for s in samples] == ["0", "1"]
    assert (report.num_rows, report.num_dropped_too_long, report.max_prompt_len) == (3, 1, 20)


def test_a_character_the_tokenizer_drops_is_an_error_naming_it(tmp_path: Path, tokenizer) -> None:
    assert tokenizer.decode(tokenizer.encode("3 − 2")) == "3  2"  # what happens without the check
    spec = write_container("jsonl", rows_of(["3 - 2", "3 − 2 = ?", "fine"]), tmp_path)
    with pytest.raises(DataError) as info:
        load_prompt_samples(spec, data(), tokenizer)
    message = str(info.value)
    assert message.startswith(f"{spec}:2: the tokenizer cannot represent '−' (U+2212 MINUS SIGN) in this prompt")
    assert "--allow-lossy-prompts" in message
    samples, report = load_prompt_samples(spec, data(allow_lossy_prompts=True), tokenizer)
    assert len(samples) == 3 and report.num_lossy == 1 and report.first_lossy == f"{spec}:2 (−)"


def test_unknown_tokens_are_found_and_byte_level_tokenizers_are_not_checked(tmp_path: Path) -> None:
    words = word_level_tokenizer()
    assert can_lose_characters(words)
    check = CharacterCheck(words)
    text = "what is 3 − 2 ?"
    assert check.lost_characters(text, words.encode(text)) == "−"
    assert check.lost_characters("what is 3 ?", words.encode("what is 3 ?")) == ""
    # every character already seen in a clean prompt, but "sit" is no word of the vocabulary: [UNK], found
    assert check.lost_characters("what is sit ?", words.encode("what is sit ?")) == "sit"
    spec = write_container("jsonl", rows_of(["what is 3 ?", text]), tmp_path)
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: the tokenizer cannot represent '−'"):
        load_prompt_samples(spec, data(), words)
    byte_level = byte_level_tokenizer()
    assert not can_lose_characters(byte_level)
    samples, report = load_prompt_samples(spec, data(), byte_level)
    assert byte_level.decode(samples[1].prompt_tokens) == text and report.num_lossy == 0


def test_a_prompt_in_a_script_the_vocabulary_lacks_names_a_few_characters_and_counts_the_rest(
        tmp_path: Path, tokenizer) -> None:
    text = "日本語のテキストです"  # ten characters, none in the demo's vocabulary
    lost = CharacterCheck(tokenizer).lost_characters(text, tokenizer.encode(text))
    assert lost == text
    assert describe_characters(lost) == ("'日' (U+65E5 CJK UNIFIED IDEOGRAPH-65E5), '本' (U+672C CJK UNIFIED "
                                         "IDEOGRAPH-672C), '語' (U+8A9E CJK UNIFIED IDEOGRAPH-8A9E), 'の' (U+306E "
                                         "HIRAGANA LETTER NO), 'テ' (U+30C6 KATAKANA LETTER TE) and 5 other characters")
    spec = write_container("jsonl", rows_of(["fine", text]), tmp_path)
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: the tokenizer cannot represent '日'"):
        load_prompt_samples(spec, data(), tokenizer)  # not "empty": it had text, all of it lost
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: the prompt is empty \(no tokens\)"):
        load_prompt_samples(spec, data(allow_lossy_prompts=True), tokenizer)
