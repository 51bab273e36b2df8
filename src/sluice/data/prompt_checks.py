"""Checks of one tokenized prompt, at load time: its length against the limit, and characters the tokenizer lost.

Both run per row (``check_prompt``), so they work the same whether prompts are read all at once or streamed.

Length: a prompt at or past the engine's context fails its request at rollout, and one that leaves less room
than the response budget has its response cut short, both far from the row that caused it. The limit is either
``--rollout-max-prompt-len`` (longer prompts are dropped, as slime does, and the count is reported as a warning)
or, without that flag, what the model's context leaves after the response budget (a longer prompt is an error
naming its row: nothing is dropped that the user did not ask to drop).

Characters: a tokenizer without a byte-level alphabet or byte fallback drops characters missing from its
vocabulary (or maps them to its unknown token); a Unicode minus vanishing from "3 − 2" changes the question.
A byte-level tokenizer (GPT-2, Qwen, Llama 3) or one with byte fallback (Llama 2, Mistral) represents every
character, so only the other kinds are checked, by decoding the tokens and comparing the characters.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from typing import Any

from sluice.data.rows import DataError

ALLOW_LOSSY_FLAG = "--allow-lossy-prompts"


@dataclass(frozen=True)
class PromptLimit:
    """The most tokens a prompt may have, and what happens to a longer one."""

    max_len: int
    source: str  # how the limit came about, for messages: "--rollout-max-prompt-len" or the context arithmetic
    drops_longer: bool  # True: a longer prompt is dropped and counted (the flag); False: it is an error

    @classmethod
    def from_flag(cls, value: int) -> PromptLimit:
        if value <= 0:
            raise DataError(f"--rollout-max-prompt-len must be positive, got {value}")
        return cls(value, "--rollout-max-prompt-len", drops_longer=True)


@dataclass(frozen=True)
class PromptFinding:
    """What the checks found in one prompt that the caller counts (errors are raised instead)."""

    too_long: bool = False  # over a dropping limit: leave the prompt out
    lost_characters: str = ""  # characters the tokenizer cannot represent, where --allow-lossy-prompts allows it


class CharacterCheck:
    """Finds the characters of a text that its tokens no longer carry; built once per tokenizer."""

    def __init__(self, tokenizer: Any, allow_lossy: bool = False) -> None:
        self.tokenizer = tokenizer
        self.allow_lossy = allow_lossy
        self.applies = can_lose_characters(tokenizer)
        self.unk_id = getattr(tokenizer, "unk_token_id", None)
        # Characters of prompts that lost nothing. Decoding every prompt would double the load time; but whether a
        # tokenizer without an unknown token keeps a character does not depend on its neighbours (each character
        # must be in the vocabulary), so a prompt made only of known characters needs no decode. A word-level
        # loss (a whole word to the unknown token) shows as the unknown token, which is looked for in every prompt.
        self._represented: set[str] = set()

    def lost_characters(self, text: str, tokens: list[int]) -> str:
        """The characters of ``text`` (after the tokenizer's normalizer) missing from the decoded tokens, in order
        of first appearance; whitespace is left out, since normalizers legitimately fold it."""
        if not self.applies:
            return ""
        has_unknown = self.unk_id is not None and self.unk_id in tokens
        if not has_unknown and self._represented.issuperset(text):
            return ""
        decoded = set(self.tokenizer.decode(tokens, skip_special_tokens=False))
        lost = [c for c in dict.fromkeys(self._normalized(text)) if c not in decoded and not c.isspace()]
        if has_unknown:  # "[UNK]" decodes to characters of its own
            lost += [c for c in dict.fromkeys(self._unknown_text(text)) if c not in lost and not c.isspace()]
        if not lost:
            self._represented.update(text)
        return "".join(lost)

    def _unknown_text(self, text: str) -> str:
        """The parts of ``text`` that became the unknown token: a fast tokenizer maps each token to its span;
        a slow one is asked character by character."""
        try:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            return "".join(c for c in text if self.unk_id in self.tokenizer.encode(c, add_special_tokens=False))
        spans = zip(encoding["input_ids"], encoding["offset_mapping"])
        return "".join(text[start:end] for token, (start, end) in spans if token == self.unk_id)

    def _normalized(self, text: str) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        normalizer = backend.normalizer if backend is not None else None
        return normalizer.normalize_str(text) if normalizer is not None else text


def can_lose_characters(tokenizer: Any) -> bool:
    """False when the tokenizer represents every character: a byte-level pre-tokenizer, or byte fallback.
    A slow (Python) tokenizer cannot be inspected, so it is checked."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return True
    spec = json.loads(backend.to_str())
    if (spec.get("model") or {}).get("byte_fallback"):
        return False
    return not _has_byte_level(spec.get("pre_tokenizer"))


def _has_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(part) for part in pre_tokenizer.get("pretokenizers") or [])


NUM_CHARACTERS_NAMED = 5  # a prompt in a script the vocabulary lacks loses every character: name a few


def describe_characters(characters: str) -> str:
    """'−' (U+2212 MINUS SIGN), ...: a character's code and name, since many look alike in a terminal."""
    named = ", ".join(f"{c!r} (U+{ord(c):04X} {unicodedata.name(c, 'unnamed')})"
                      for c in characters[:NUM_CHARACTERS_NAMED])
    num_more = len(characters) - NUM_CHARACTERS_NAMED
    return named + (f" and {num_more} other characters" if num_more > 0 else "")


def check_prompt(where: str, text: str, tokens: list[int], limit: PromptLimit | None,
                 characters: CharacterCheck | None) -> PromptFinding:
    """Check one prompt's tokens (``where``: its file and line); raise DataError for what must not load."""
    lost = characters.lost_characters(text, tokens) if characters is not None else ""
    if lost and not characters.allow_lossy:  # first: a prompt wholly in a script the vocabulary lacks has no tokens
        raise DataError(
            f"{where}: the tokenizer cannot represent {describe_characters(lost)} in this prompt (its vocabulary "
            "lacks them and it has no byte fallback), so the model would see a different prompt; replace them in "
            f"the data, or pass {ALLOW_LOSSY_FLAG} to train on the prompts as the tokenizer reads them")
    if not tokens:  # the engine refuses a request without a prompt token, at rollout
        raise DataError(f"{where}: the prompt is empty (no tokens); the engine needs at least one prompt token")
    if limit is not None and len(tokens) > limit.max_len:
        if not limit.drops_longer:
            raise DataError(
                f"{where}: the prompt is {len(tokens)} tokens, over the {limit.max_len} a prompt may take "
                f"({limit.source}); shorten it, lower the response budget, or set --rollout-max-prompt-len to "
                "drop longer prompts (with a warning)")
        return PromptFinding(too_long=True, lost_characters=lost)
    return PromptFinding(lost_characters=lost)
