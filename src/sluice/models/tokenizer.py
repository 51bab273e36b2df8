"""Loading a checkpoint's tokenizer the same way in the engine, the trainer, the data and the demo.

transformers >= 5.2x maps some model types (qwen2 among them) to their own tokenizer class whatever the
checkpoint's tokenizer_config.json names, and that class rebuilds the pre-tokenizer from the vocabulary. For a
checkpoint that ships its own tokenizer.json and names the generic fast class, that silently changes the
tokenization (the demo's character tokenizer lost its spaces and its role tokens). When the checkpoint names
the generic class, we load its tokenizer.json as it is; otherwise AutoTokenizer decides, as usual.
The demo's tokenizer is written in byte-level form (demo/tokenizer.py), so plain AutoTokenizer, which a user of
an exported checkpoint calls, builds the same tokenizer from it as this loader does.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

_GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    config_file = Path(path) / "tokenizer_config.json"
    if config_file.is_file() and (Path(path) / "tokenizer.json").is_file():
        try:
            named = json.loads(config_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}: not valid JSON ({error})") from error
        if named in _GENERIC_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
