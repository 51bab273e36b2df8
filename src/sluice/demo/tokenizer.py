"""A character-level tokenizer built with the `tokenizers` library and saved in Hugging Face format.

Each printable ASCII character (and newline) is one token, so arithmetic and string tasks are learnable by
a model with a few hundred thousand parameters. The chat role names are whole tokens, as in real BPE
vocabularies, which keeps the chat markup around a prompt at 7 tokens instead of 19. The chat template is Qwen's (`<|im_start|>role ...`),
written into tokenizer_config.json so `AutoTokenizer` and `apply_chat_template` work as for any checkpoint.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

PAD_TOKEN = "<|endoftext|>"
BOS_CHAT = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_CHAT, EOS_TOKEN)
CHARACTERS = tuple(string.printable[:95]) + ("\n",)  # digits, letters, punctuation, space, newline
ROLE_TOKENS = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer() -> Tokenizer:
    """Specials first (ids 0..2), then one id per character; BPE with no merges splits into characters."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens([AddedToken(role, normalized=False, special=False) for role in ROLE_TOKENS])
    tokenizer.decoder = decoders.Fuse()  # join characters without the spaces a plain decode would insert
    return tokenizer


def save_tokenizer(out_dir: str | Path) -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the vocab size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}, indent=2))
    return tokenizer.get_vocab_size()
