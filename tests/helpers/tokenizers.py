"""Tokenizers built on the fly for tests that need a particular kind (the demo's own is byte-level)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast


def printable_ascii_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, no byte fallback and no unknown token: any other character is
    dropped when encoding, as a real tokenizer of that kind does."""
    vocab = {chr(code): index for index, code in enumerate(range(32, 127))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)
