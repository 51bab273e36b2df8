"""Loading a checkpoint's tokenizer the same way in the engine, the trainer, the data and the demo.

transformers >= 5.2x maps some model types (qwen2 among them) to their own tokenizer class whatever the
checkpoint's tokenizer_config.json names, and that class rebuilds the pre-tokenizer from the vocabulary. For a
checkpoint that ships its own tokenizer.json and names the generic fast class, that silently changes the
tokenization (the demo's character tokenizer lost its spaces and its role tokens). When the checkpoint names
the generic class, we load its tokenizer.json as it is; otherwise AutoTokenizer decides, as usual.
The demo's tokenizer is written in byte-level form (demo/tokenizer.py), so plain AutoTokenizer, which a user of
an exported checkpoint calls, builds the same tokenizer from it as this loader does.

A directory without tokenizer files still loads with AutoTokenizer (the model type's class, with an empty
vocabulary) and encodes every text to no tokens; that is refused here, so prompts never silently become empty.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

_GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


_PROBE_TEXT = "Hello world 123"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = _load(path)
    if not tokenizer.encode(_PROBE_TEXT, add_special_tokens=False):
        raise ValueError(f"{path}: the tokenizer loaded from here encodes {_PROBE_TEXT!r} to no tokens; are its "
                         "tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...) missing?")
    return tokenizer


def _load(path: str | Path) -> PreTrainedTokenizerBase:
    config_file = Path(path) / "tokenizer_config.json"
    if config_file.is_file() and (Path(path) / "tokenizer.json").is_file():
        try:
            named = json.loads(config_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}: not valid JSON ({error})") from error
        if named in _GENERIC_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
