"""SFT rows as training samples: prompt + response token ids, and the loss mask over the assistant's tokens.

A row gives a prompt (``--input-key``) and a response (``--response-key``): a string is the assistant's reply,
a list of chat messages continues the conversation; when both keys are the same, the value is one whole
conversation whose response starts at its first assistant turn (slime's SFT layout).

With ``--apply-chat-template`` the conversation is rendered up to each trained assistant turn, with and without
it: the differences between renderings are the pieces (the untrained text before the turn, its assistant header
included, then the turn), and each piece is tokenized on its own, the way a multi-turn rollout grows its tokens. An assistant turn of the response trains
on what the model would write there: its content and the template's end-of-turn token (the last special token
of the turn), not the header before it (the generation prompt) nor the separator after it. System, user and
tool turns, and assistant turns inside the prompt (few-shot examples), get loss mask 0. Without a chat
template, prompt and response must be text; the response is followed by the EOS token, so the model learns
to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sluice.data.chat_messages import check_messages
from sluice.data.rows import DataError

ASSISTANT = "assistant"


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered conversation and whether its tokens are trained."""

    text: str
    trained: bool


@dataclass
class SftTokens:
    """One row, tokenized: ``prompt_ids + response_ids`` is the trained sequence."""

    prompt_text: str  # the rendered prompt (up to the first trained token)
    prompt_ids: list[int]
    response_text: str  # the rendered rest, to the end of the last trained turn
    response_ids: list[int]
    loss_mask: list[int]  # per response token: 1 on assistant tokens of the response, 0 elsewhere


def conversation(where: str, prompt: Any, response: Any, input_key: str, response_key: str
                 ) -> tuple[list[dict[str, Any]], int]:
    """The row's messages and the index of the first message of the response."""
    if input_key == response_key:
        if not isinstance(prompt, list):
            raise DataError(f"{where}: {input_key!r} (--input-key and --response-key) must be a list of chat "
                            f"messages, the whole conversation; got {type(prompt).__name__}")
        messages = check_messages(where, input_key, prompt)
        first = next((i for i, m in enumerate(messages) if m["role"] == ASSISTANT), None)
        if first is None:
            raise DataError(f"{where}: {input_key!r} (--input-key and --response-key) has no assistant turn to "
                            "train on")
        if first == 0:
            raise DataError(f"{where}: {input_key!r} starts with an assistant turn; the conversation needs a "
                            "prompt (a system or user turn) before it")
        return messages, first
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(
        where, input_key, _as_list(where, input_key, prompt))
    if isinstance(response, str):
        return head + [{"role": ASSISTANT, "content": response}], len(head)
    tail = check_messages(where, response_key, _as_list(where, response_key, response))
    if not any(m["role"] == ASSISTANT for m in tail):
        raise DataError(f"{where}: {response_key!r} (--response-key) has no assistant turn to train on")
    return head + tail, len(head)


def _as_list(where: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a string or a list of chat messages, got {type(value).__name__}")
    return value


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
            template_kwargs: dict[str, Any], where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **template_kwargs)
    except Exception as exc:  # jinja errors are opaque without the row they came from
        raise DataError(f"{where}: chat template failed on the first {len(messages)} messages: "
                        f"{type(exc).__name__}: {exc}") from exc
    return text


def _after(where: str, before: str, after: str) -> str:
    """What rendering one more message added; the template must not rewrite what it rendered before."""
    if not after.startswith(before):
        raise DataError(f"{where}: the chat template renders earlier turns differently once later ones follow "
                        "(e.g. it strips reasoning from earlier assistant turns), so the conversation cannot be "
                        "split into turns for the loss mask; use a template without history rewriting")
    return after[len(before):]


def _end_of_turn(turn: str, special_tokens: list[str]) -> int:
    """Where the trained part of an assistant turn ends: after its last special token (``<|im_end|>``); what
    follows (a newline between turns) is template markup the model never writes. No special token: all of it."""
    ends = [turn.rindex(token) + len(token) for token in special_tokens if token and token in turn]
    return max(ends, default=len(turn))


def chat_segments(tokenizer: Any, messages: list[dict[str, Any]], first_response: int,
                  template_kwargs: dict[str, Any], where: str) -> list[Segment]:
    """The conversation as rendered pieces, up to its last trained turn: the assistant turns from
    ``first_response`` on are trained, and everything between them is one untrained piece each.

    Only the renderings at assistant turns are compared, so a template may render a run of other messages
    together (Qwen's puts consecutive tool results in one user turn)."""
    special_tokens = list(getattr(tokenizer, "all_special_tokens", []))
    segments, rendered = [], ""
    for i in range(first_response, len(messages)):
        if messages[i]["role"] != ASSISTANT:
            continue
        head = _render(tokenizer, messages[:i], True, template_kwargs, where)  # ends with the assistant header
        segments.append(Segment(_after(where, rendered, head), trained=False))
        rendered = _render(tokenizer, messages[: i + 1], False, template_kwargs, where)
        turn = _after(where, head, rendered)
        end = _end_of_turn(turn, special_tokens)
        segments += [Segment(turn[:end], trained=True), Segment(turn[end:], trained=False)]
    return segments


def split_tokens(tokenizer: Any, segments: list[Segment], eos_after: bool, where: str) -> SftTokens:
    """Token ids of ``segments`` (each tokenized on its own), split at the first trained token; untrained
    tokens after the last trained one are dropped (no loss, nothing after them). ``eos_after``: a trained EOS
    token ends the sequence (plain text has no end-of-turn token of its own)."""
    ids, mask, texts = [], [], []
    for segment in segments:
        piece = list(tokenizer.encode(segment.text, add_special_tokens=False)) if segment.text else []
        ids += piece
        mask += [int(segment.trained)] * len(piece)
        texts.append((segment.text, segment.trained))
    if eos_after:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    if 1 not in mask:
        raise DataError(f"{where}: the response renders to no tokens to train on")
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    first_text = next(i for i, (_, trained) in enumerate(texts) if trained)
    last_text = max(i for i, (_, trained) in enumerate(texts) if trained)
    return SftTokens(prompt_text="".join(text for text, _ in texts[:first_text]), prompt_ids=ids[:first],
                     response_text="".join(text for text, _ in texts[first_text:last_text + 1]),
                     response_ids=ids[first:last], loss_mask=mask[first:last])


def sft_tokens(where: str, prompt: Any, response: Any, *, input_key: str, response_key: str,
               apply_chat_template: bool, template_kwargs: dict[str, Any], tokenizer: Any) -> SftTokens:
    """Token ids and loss mask of one SFT row (see the module docstring)."""
    if not apply_chat_template:
        for key, value in ((input_key, prompt), (response_key, response)):
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r} is {type(value).__name__}; without --apply-chat-template the "
                                "prompt and the response must be text (pass --apply-chat-template for chat messages)")
        if input_key == response_key:
            raise DataError(f"{where}: --input-key and --response-key are both {input_key!r}; a text row needs "
                            "separate prompt and response keys (one key is for whole chat conversations)")
        return split_tokens(tokenizer, [Segment(prompt, False), Segment(response, True)], eos_after=True, where=where)
    messages, first = conversation(where, prompt, response, input_key, response_key)
    segments = chat_segments(tokenizer, messages, first, template_kwargs, where)
    return split_tokens(tokenizer, segments, eos_after=False, where=where)
