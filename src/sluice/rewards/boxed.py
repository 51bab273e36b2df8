"""Scoring only the final ``\\boxed{...}`` answer, the convention of most math-reasoning prompts."""

from __future__ import annotations

from typing import Any

from sluice.rewards.exact import exact_match
from sluice.rewards.math import math_reward

_BOX = "\\boxed{"


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, or None when there is none.

    Braces are matched by depth so nested groups (``\\boxed{\\frac{1}{2}}``) come out whole; escaped
    braces (``\\{``, ``\\}``) are content, not grouping. If the last box is never closed (a response cut at
    the token limit) the result is None rather than an earlier box, which would be a stale intermediate value.
    The content is returned as written, without stripping.
    """
    start = text.rfind(_BOX)
    if start < 0:
        return None
    begin = start + len(_BOX)
    depth = 1
    i = begin
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


def boxed_exact(response: str, label: Any) -> float:
    """``exact_match`` on the last boxed answer; 0.0 when the response has no complete box."""
    answer = extract_boxed(response)
    if answer is None:
        if label is None:
            raise ValueError("boxed_exact needs a label, got None (is --label-key set?)")
        return 0.0
    return exact_match(answer, label)


def boxed_math(response: str, label: Any) -> float:
    """``math_reward`` on the last boxed answer only; 0.0 when the response has no complete box.

    The answer is re-wrapped in ``\\boxed{}`` so math_verify parses it as LaTeX even without ``$`` delimiters.
    """
    answer = extract_boxed(response)
    if answer is None:
        if label is None:
            raise ValueError("boxed_math needs a label, got None (is --label-key set?)")
        return 0.0
    return math_reward(_BOX + answer + "}", label)
