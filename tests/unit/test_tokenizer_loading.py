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
