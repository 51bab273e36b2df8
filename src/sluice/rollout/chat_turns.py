"""Token ids that continue a conversation after an assistant turn the model generated, without re-tokenising it.

Multi-turn training must train on exactly the tokens the engine sampled. Re-rendering the whole conversation
through the chat template and tokenising it again can give different ids for the same text (a BPE merge across
the turn boundary, whitespace the template strips), and the trained tokens would no longer be the sampled ones.
So the conversation is grown token-wise: prompt ids + generated ids + ids of what the template puts between
that turn and the next assistant turn (tool results, a user reply, the next assistant header). That last part
is found by rendering a probe conversation with and without the new messages and taking the difference.
"""

from __future__ import annotations

from typing import Any

from sluice.engine.clients.protocol import FinishReason, GenerateResult

PROBE = "sluice-turn-probe"


class TemplateError(ValueError):
    """The chat template cannot be continued turn by turn (it rewrites earlier turns once later ones follow)."""


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
            template_kwargs: dict[str, Any]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def continuation_text(tokenizer: Any, stop_text: str, next_messages: list[dict[str, Any]],
                      template_kwargs: dict[str, Any] | None = None) -> str:
    """The text the template puts after an assistant turn and before the model's next turn: the rest of the
    turn's closing markup, ``next_messages``, and the next assistant header.

    ``stop_text`` is the text of the stop token that ended the generated turn (``"<|im_end|>"``), or "" when the
    turn ended otherwise (a stop string): a closing that starts with it is not repeated.
    """
    kwargs = dict(template_kwargs or {})
    probe = [{"role": "user", "content": PROBE}, {"role": "assistant", "content": PROBE}]
    before = _render(tokenizer, probe, False, kwargs)
    after = _render(tokenizer, probe + list(next_messages), True, kwargs)
    if not after.startswith(before):
        raise TemplateError("the chat template renders an assistant turn differently once messages follow it, so "
                            "a conversation cannot be continued token for token; use a template without history "
                            "rewriting (e.g. no reasoning stripping of earlier turns)")
    closing = before[before.rindex(PROBE) + len(PROBE):]  # e.g. "<|im_end|>\n" after an assistant message
    if stop_text and closing.startswith(stop_text):
        closing = closing[len(stop_text):]
    return closing + after[len(before):]


def stop_token_text(tokenizer: Any, result: GenerateResult) -> str:
    """The text of the stop token (EOS or a stop token id) that ended ``result``; "" if none did."""
    if result.finish_reason is FinishReason.STOP and isinstance(result.matched_stop, int):
        return tokenizer.decode([result.matched_stop], skip_special_tokens=False)
    return ""


def continuation_ids(tokenizer: Any, result: GenerateResult, next_messages: list[dict[str, Any]],
                     template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids to append after the generated turn ``result`` (see the module docstring)."""
    text = continuation_text(tokenizer, stop_token_text(tokenizer, result), next_messages, template_kwargs)
    return list(tokenizer.encode(text, add_special_tokens=False))
