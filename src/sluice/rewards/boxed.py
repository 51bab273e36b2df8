"""Scoring only the final ``\\boxed{...}`` answer, the convention of most math-reasoning prompts.

``--rm-type boxed_<name>`` applies the text reward ``<name>`` to the last box's content (see registry.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sluice.rewards.exact import exact_match
from sluice.rewards.math import math_reward

BOXED_PREFIX = "boxed_"
_BOX = "\\boxed{"


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, or None when there is none.

    Braces are matched by depth so nested groups (``\\boxed{\\frac{1}{2}}``) come out whole; escaped
    braces (``\\{``, ``\\}``) are content, not grouping. If the last box is never closed (a response cut at
    the token limit) the result is None rather than an earlier box, which would be a stale intermediate value.
    The content is returned as written, without stripping.

    >>> extract_boxed("so \\\\boxed{\\\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    >>> extract_boxed("\\\\boxed{1} and \\\\boxed{2") is None
    True
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


def boxed_variant(score: Callable[[str, Any], float], hand_over: Callable[[str], str],
                  name: str) -> Callable[[str, Any], float]:
    """``score`` applied to ``hand_over(last boxed answer)``; 0.0 when the response has no complete box."""

    def boxed_score(response: str, label: Any) -> float:
        if label is None:
            raise ValueError(f"{name} needs a label, got None (is --label-key set?)")
        answer = extract_boxed(response)
        return 0.0 if answer is None else score(hand_over(answer), label)

    boxed_score.__name__ = boxed_score.__qualname__ = name
    return boxed_score


def boxed_exact(response: str, label: Any) -> float:
    """``exact_match`` on the last boxed answer; 0.0 when the response has no complete box.

    >>> boxed_exact("I think 7, so \\\\boxed{ 42 }", 42), boxed_exact("42", 42)
    (1.0, 0.0)
    """
    return boxed_variant(exact_match, lambda answer: answer, "boxed_exact")(response, label)


def boxed_math(response: str, label: Any) -> float:
    """``math_reward`` on the last boxed answer only; 0.0 when the response has no complete box.

    >>> boxed_math("first 0.3, then \\\\boxed{\\\\frac{1}{2}}", "0.5"), boxed_math("the answer is 0.5", "0.5")
    (1.0, 0.0)
    """
    return boxed_variant(math_reward, lambda answer: _BOX + answer + "}", "boxed_math")(response, label)
