"""A character-level tokenizer built with the `tokenizers` library and saved in Hugging Face format.

Each printable ASCII character (and newline) is one token, so arithmetic and string tasks are learnable by
a model with a few hundred thousand parameters. The chat role names are whole tokens, as in real BPE
vocabularies, which keeps the chat markup around a prompt at 7 tokens instead of 19. The chat template is Qwen's
(`<|im_start|>role ...`), written into tokenizer_config.json so `apply_chat_template` works as for any checkpoint.

The characters are stored in byte-level form (a space is ``Ġ``, a newline ``Ċ``), with a byte-level pre-tokenizer
and decoder, the way Qwen2's own vocabulary is. That is for plain ``transformers.AutoTokenizer``: for a
``model_type`` of ``qwen2`` it loads ``Qwen2Tokenizer`` whatever tokenizer_config.json names, and that class keeps
the vocabulary but rebuilds the pre-tokenizer and decoder as byte-level ones. A vocabulary of raw characters then
loses its spaces and newlines; a byte-level one tokenizes the same either way (no merges, so Qwen's split regex
changes nothing). The role and tool tokens are listed in ``added_tokens_decoder`` so that class keeps them too.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

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

# Qwen's tool markup as whole tokens, as in Qwen2.5's vocabulary (added, not special: they are decoded).
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Qwen2.5's tool conventions in a compact form for a tiny model: the tools are listed by name in a system turn;
# an assistant's calls are <tool_call>{"name": ..., "arguments": {...}}</tool_call>; consecutive tool results go
# into one user turn, each inside <tool_response>...</tool_response>. Without tools it renders like CHAT_TEMPLATE.
# Assistant turns are marked {% generation %} (transformers' return_assistant_tokens_mask): what a model writes.
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n' }}{%- endif %}"
    "{{- 'tools:' }}{%- for tool in tools %}{{- ' ' + (tool['function'] or tool)['name'] }}{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- generation %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- set call = call['function'] or call %}"
    "{{- '<tool_call>{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{%- if call['arguments'] is string %}{{- call['arguments'] }}"
    "{%- else %}{{- call['arguments'] | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _byte_level(character: str) -> str:
    """The byte-level spelling of one ASCII character, as the byte-level pre-tokenizer writes it (" " -> "Ġ")."""
    return BYTE_LEVEL.pre_tokenize_str(character)[0][0]


def added_tokens(with_tools: bool = False) -> tuple[str, ...]:
    """The whole-word tokens after the characters: role names, then (``with_tools``) the tool markup."""
    return ROLE_TOKENS + (TOOL_TOKENS if with_tools else ())


def build_tokenizer(with_tools: bool = False) -> Tokenizer:
    """Specials first (ids 0..2), then one id per character; BPE with no merges splits into characters.

    ``with_tools`` adds Qwen's tool markup tokens after the role tokens (the default vocabulary is unchanged).
    NFC, the byte-level pre-tokenizer and decoder are the ones ``Qwen2Tokenizer`` rebuilds (module docstring).
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(map(_byte_level, CHARACTERS)))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = BYTE_LEVEL
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in added_tokens(with_tools)])
    return tokenizer


def save_tokenizer(out_dir: str | Path, with_tools: bool = False) -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the vocab size.

    ``with_tools``: the tool markup tokens and ``TOOL_CHAT_TEMPLATE`` (tool calls and results, Qwen-style).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(with_tools)
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": tok in SPECIAL_TOKENS,
        }
        for tok in SPECIAL_TOKENS + added_tokens(with_tools)
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
        "chat_template": TOOL_CHAT_TEMPLATE if with_tools else CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}, indent=2))
    return tokenizer.get_vocab_size()
