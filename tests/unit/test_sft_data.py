"""SFT rows as samples (data/sft.py): token ids and the loss mask, checked against the chat template itself."""

from __future__ import annotations

import json

import pytest

from sluice.config import DataConfig
from sluice.data import DataError, check_first_row, load_prompt_samples
from sluice.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def tool_tokenizer(tmp_path_factory):
    """The demo tokenizer whose template marks assistant turns with {% generation %} (transformers' mask)."""
    from sluice.demo.tokenizer import save_tokenizer

    path = tmp_path_factory.mktemp("tool_tokenizer")
    save_tokenizer(path, with_tools=True)
    return load_tokenizer(path)


def _write(tmp_path, rows, name="sft.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _load(tmp_path, rows, tokenizer, **data):
    config = DataConfig(**{"response_key": "response", **data})
    samples, _ = load_prompt_samples(_write(tmp_path, rows), config, tokenizer)
    return samples


def test_text_rows_train_on_the_response_and_eos_only(tmp_path, tokenizer):
    (sample,) = _load(tmp_path, [{"input": "12+30=", "response": "42"}], tokenizer)
    assert sample.prompt_tokens == tokenizer.encode("12+30=", add_special_tokens=False)
    assert sample.tokens == sample.prompt_tokens + tokenizer.encode("42", add_special_tokens=False) + [
        tokenizer.eos_token_id]
    assert sample.response_length == 3 and sample.loss_mask == [1, 1, 1]


def test_chat_rows_train_on_the_reply_and_its_end_of_turn_token(tmp_path, tokenizer):
    (sample,) = _load(tmp_path, [{"input": "12+30=", "response": "42"}], tokenizer, apply_chat_template=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "12+30="}], tokenize=False,
                                           add_generation_prompt=True)
    assert sample.prompt_tokens == tokenizer.encode(prompt, add_special_tokens=False)
    assert sample.metadata["prompt_text"] == prompt
    response = sample.tokens[len(sample.prompt_tokens):]
    assert tokenizer.decode(response) == "42<|im_end|>"  # not the newline the template puts after the turn
    assert sample.loss_mask == [1] * 3 and sample.response_length == 3


def test_multi_turn_messages_mask_exactly_the_assistant_turns(tmp_path, tool_tokenizer):
    """Checked token by token against the template's own assistant mask ({% generation %} blocks)."""
    messages = [{"role": "system", "content": "Add numbers."}, {"role": "user", "content": "1+2="},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "and 40+2?"},
                {"role": "assistant", "content": "<tool_call>{}</tool_call>"}, {"role": "tool", "content": "42"},
                {"role": "assistant", "content": "42"}]
    (sample,) = _load(tmp_path, [{"messages": messages}], tool_tokenizer, apply_chat_template=True,
                      input_key="messages", response_key="messages")
    reference = tool_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
    ids, mask = list(reference["input_ids"]), list(reference["assistant_masks"])
    last = len(mask) - mask[::-1].index(1)  # the template's separator after the last turn is not kept
    assert sample.tokens == ids[:last]
    full_mask = [0] * len(sample.prompt_tokens) + sample.loss_mask
    assert full_mask == mask[:last]
    assert sum(full_mask) == 1 + 4 + 2 + 3  # "3"; <tool_call> { } </tool_call>; "42"; three <|im_end|>
    trained = [t for t, m in zip(sample.tokens, full_mask) if m]
    assert tool_tokenizer.decode(trained) == "3<|im_end|><tool_call>{}</tool_call><|im_end|>42<|im_end|>"
    assert tool_tokenizer.decode(sample.prompt_tokens).endswith("<|im_start|>user\n1+2=<|im_end|>\n"
                                                                "<|im_start|>assistant\n")


def test_a_message_list_response_continues_the_prompt_and_few_shot_turns_are_not_trained(tmp_path, tokenizer):
    prompt = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
              {"role": "user", "content": "2+2="}]
    response = [{"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3="},
                {"role": "assistant", "content": "6"}]
    (sample,) = _load(tmp_path, [{"input": prompt, "response": response}], tokenizer, apply_chat_template=True)
    trained = [t for t, m in zip(sample.tokens[len(sample.prompt_tokens):], sample.loss_mask) if m]
    assert tokenizer.decode(trained) == "4<|im_end|>6<|im_end|>"  # not the "2" of the prompt's example
    assert tokenizer.decode(sample.tokens) == tokenizer.apply_chat_template(prompt + response, tokenize=False).rstrip("\n")


def test_a_nested_response_key_is_followed(tmp_path, tokenizer):
    rows = [{"q": {"text": "5+5="}, "target": {"answers": [{"text": "10"}]}}]
    (sample,) = _load(tmp_path, rows, tokenizer, input_key="q.text", response_key="target.answers.0.text")
    assert tokenizer.decode(sample.tokens[len(sample.prompt_tokens):]) == "10<|im_end|>"


def test_a_missing_response_key_names_file_line_and_key(tmp_path, tokenizer):
    rows = [{"input": "1+1=", "response": "2"}, {"input": "2+2=", "answer": "4"}]
    with pytest.raises(DataError, match=r"sft.jsonl:2: missing key 'response' \(set by --response-key\).*answer"):
        _load(tmp_path, rows, tokenizer)
    spec = _write(tmp_path, [{"input": "1+1=", "target": {"text": "2"}}], "first.jsonl")
    with pytest.raises(DataError, match=r"first.jsonl:1: missing key 'target.answer'.*'target' has no 'answer'"):
        check_first_row(spec, DataConfig(response_key="target.answer"))


@pytest.mark.parametrize("row, data, message", [
    ({"input": [{"role": "user", "content": "hi"}], "response": "yo"}, {},
     r"sft.jsonl:1: 'input' is list; without --apply-chat-template"),
    ({"messages": [{"role": "user", "content": "hi"}]}, {"input_key": "messages", "response_key": "messages",
                                                          "apply_chat_template": True},
     r"sft.jsonl:1: 'messages' .* has no assistant turn"),
    ({"input": "hi", "response": [{"role": "user", "content": "more"}]}, {"apply_chat_template": True},
     r"sft.jsonl:1: 'response' \(--response-key\) has no assistant turn"),
    ({"input": "hi", "response": [{"role": "assistant"}]}, {"apply_chat_template": True},
     r"sft.jsonl:1: 'response'\[0\] needs a string 'content'"),
    ({"messages": "hi"}, {"input_key": "messages", "response_key": "messages", "apply_chat_template": True},
     r"sft.jsonl:1: 'messages' \(--input-key and --response-key\) must be a list of chat messages, the whole "
     r"conversation; got str"),
    ({"input": "hi", "response": 7}, {"apply_chat_template": True},
     r"sft.jsonl:1: 'response' must be a string or a list of chat messages, got int"),
])
def test_bad_rows_are_named(tmp_path, tokenizer, row, data, message):
    with pytest.raises(DataError, match=message):
        _load(tmp_path, [row], tokenizer, **data)


def test_consecutive_tool_results_rendered_as_one_turn_are_not_trained(tmp_path, tool_tokenizer):
    """Qwen's template puts a run of tool results in one user turn, closed only after the last of them."""
    messages = [{"role": "user", "content": "2+3 and 4+5?"},
                {"role": "assistant", "content": "<tool_call>{}</tool_call><tool_call>{}</tool_call>"},
                {"role": "tool", "content": "5"}, {"role": "tool", "content": "9"},
                {"role": "assistant", "content": "5 and 9"}]
    (sample,) = _load(tmp_path, [{"messages": messages}], tool_tokenizer, apply_chat_template=True,
                      input_key="messages", response_key="messages")
    reference = tool_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
    mask = list(reference["assistant_masks"])
    last = len(mask) - mask[::-1].index(1)
    assert sample.tokens == list(reference["input_ids"])[:last]
    assert [0] * len(sample.prompt_tokens) + sample.loss_mask == mask[:last]
