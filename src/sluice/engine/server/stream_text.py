"""Incremental detokenization for streamed responses: text pieces that concatenate to the final text.

Two hazards make "decode the new tokens" wrong. A byte-level BPE token can carry half of a UTF-8 character, so a
piece decoded on its own ends in U+FFFD; and a tokenizer may render a token differently depending on its left
neighbour. So each step decodes a window that starts at the previous step's tokens and keeps only what the
window adds beyond them, and it waits while the window ends in U+FFFD.

A stop string is matched on text and trimmed from the final output, so text that could be the start of a stop
string is held back (the longest stop string's length minus one characters) until the next step or the end,
and nothing from a complete stop string on is sent (the engine finishes on it).
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalText:
    """Turns the growing list of output tokens into text deltas; ``finish`` sends the rest of the final text."""

    def __init__(self, tokenizer, skip_special_tokens: bool, stop: list[str]):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stops = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, held-back characters included
        self.sent = ""  # the prefix of ``text`` already handed out
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are already part of ``text``

    def push(self, new_ids: list[int]) -> str:
        """Add generated tokens; returns the text that is now safe to send (maybe "")."""
        self.ids.extend(new_ids)
        self.text += self._decode_new()
        safe = self.text[: self._safe_length()]
        if len(safe) <= len(self.sent):
            return ""
        delta = safe[len(self.sent) :]
        self.sent = safe
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the request's final text (stop string trimmed); "" if what was sent diverged from it."""
        if not final_text.startswith(self.sent):
            return ""  # cannot happen with the hold-back unless the tokenizer decodes non-monotonically
        delta = final_text[len(self.sent) :]
        self.sent = final_text
        return delta

    def _safe_length(self) -> int:
        """Up to the first complete stop string (the engine finishes on it; its final text is cut there), else
        all but the characters that could begin one. No stop string can start inside the sent text."""
        cut = len(self.text) - self.holdback
        for stop in self.stops:
            found = self.text.find(stop, len(self.sent))
            if found != -1:
                cut = min(cut, found)
        return cut

    def _decode_new(self) -> str:
        window_known = self._decode(self.ids[self._prefix_offset : self._read_offset])
        window_all = self._decode(self.ids[self._prefix_offset :])
        if len(window_all) <= len(window_known) or window_all.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or an incomplete character: wait for the next token
        # The tokens just read become the next window's left context.
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return window_all[len(window_known) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids or self.tokenizer is None:  # a server without a tokenizer streams token ids only
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
