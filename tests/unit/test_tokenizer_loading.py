"""A checkpoint that names the generic fast tokenizer is tokenized by its own tokenizer.json."""

from __future__ import annotations

import json

import pytest

from sluice.demo.tokenizer import build_tokenizer
from sluice.models.tokenizer import load_tokenizer


def test_the_demo_checkpoint_keeps_its_spaces_newlines_and_role_tokens(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    reference = build_tokenizer()  # the tokenizers object the checkpoint was written from
    text = "reverse 80512\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=True,
                                           add_generation_prompt=True)["input_ids"]
    assert reference.token_to_id("assistant") in prompt  # one token, not spelled out in characters


def test_a_broken_tokenizer_config_is_named(tmp_path, tiny_checkpoint):
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())  # nothing else was touched


CHAT = [{"role": "system", "content": "Add.\nAnswer with digits."}, {"role": "user", "content": "34 + 58 ="},
        {"role": "assistant", "content": "92"}, {"role": "user", "content": "and\n\n 1+1?"}]


def _assert_auto_tokenizer_matches(directory, with_tools=False):
    """Plain AutoTokenizer on ``directory`` gives sluice's ids for a chat, and decodes back to the text."""
    from transformers import AutoTokenizer

    auto, ours = AutoTokenizer.from_pretrained(directory), load_tokenizer(directory)
    reference = build_tokenizer(with_tools)
    text = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == auto.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "\n" in text and " " in text
    ids = ours.encode(text, add_special_tokens=False)
    assert auto.encode(text, add_special_tokens=False) == ids == reference.encode(text).ids
    assert auto.decode(ids) == text == ours.decode(ids)
    for role in ("system", "user", "assistant"):  # whole tokens through either loader
        assert auto.convert_tokens_to_ids(role) == reference.token_to_id(role)
    assert ids.count(reference.token_to_id("assistant")) == 2
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"


def test_auto_tokenizer_loads_the_demo_checkpoint_as_sluice_does(tiny_checkpoint):
    _assert_auto_tokenizer_matches(tiny_checkpoint)


def test_auto_tokenizer_loads_an_hf_export_as_sluice_does(tmp_path, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    from sluice.checkpoint.hf_export import export_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    out = export_hf(model, load_tokenizer(tiny_checkpoint), tmp_path / "export")
    _assert_auto_tokenizer_matches(out)


def test_auto_tokenizer_keeps_the_tool_tokens(tmp_path):
    from transformers import AutoTokenizer

    from sluice.demo.model import TinyModelShape, build_checkpoint

    build_checkpoint(tmp_path, shape=TinyModelShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1),
                     with_tools=True)
    _assert_auto_tokenizer_matches(tmp_path, with_tools=True)
    text = '<tool_call>{"name": "calculator"}</tool_call>\n<tool_response>\n92\n</tool_response>'
    auto = AutoTokenizer.from_pretrained(tmp_path)
    ids = auto.encode(text, add_special_tokens=False)
    assert ids == build_tokenizer(with_tools=True).encode(text).ids and auto.decode(ids) == text
