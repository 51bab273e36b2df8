"""Math answer equivalence through ``math_verify``, so that ``\\frac{1}{2}``, ``0.5`` and ``1/2`` all match."""

from __future__ import annotations

import threading
from typing import Any

from math_verify import parse, verify

# math_verify's own default; a parse or comparison of one expression that takes longer is treated as wrong.
DEFAULT_TIMEOUT_S = 5


def _timeout_for_this_thread(timeout_s: int | None) -> int | None:
    """The timeout to hand math_verify, or None where its timeout cannot work.

    math_verify times out with ``signal.alarm``, which only works in the main thread; elsewhere it raises
    inside math_verify, which then reports "not equal" for every answer. Reward functions normally run in
    worker threads (``sluice.plugins.call_in_thread``), so there we turn the timeout off; a caller that must bound the
    time per sample does it around the call (``score_samples(..., timeout_s=...)``).
    """
    if threading.current_thread() is threading.main_thread():
        return timeout_s
    return None


def _parse_gold(label: Any, timeout: int | None) -> list:
    """Parse the reference answer; a bare LaTeX label such as ``x^2+1`` only parses inside ``$...$``."""
    text = str(label).strip()
    gold = parse(text, parsing_timeout=timeout)
    if not gold:
        gold = parse(f"${text}$", parsing_timeout=timeout)
    return gold


def math_reward(response: str, label: Any, *, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the answer math_verify extracts from the response is equivalent to the label; else 0.0.

    Any error while parsing or comparing scores 0.0: a malformed model answer must never crash a rollout.
    A missing label is the one exception, raised, since it is a data/config mistake rather than a wrong answer.
    Safe to call from any thread (see ``_timeout_for_this_thread``).

    >>> math_reward("The answer is $\\\\frac{1}{2}$", "0.5"), math_reward("so it is 1/2", "\\\\frac{1}{2}")
    (1.0, 1.0)
    >>> math_reward("$0.5$", "1/2"), math_reward("$x^2 + 1$", "x^2+1"), math_reward("$1/3$", "0.5")
    (1.0, 1.0, 0.0)
    """
    if label is None:
        raise ValueError("math_reward needs a label, got None (is --label-key set?)")
    timeout = _timeout_for_this_thread(timeout_s)
    try:
        gold = _parse_gold(label, timeout)
        if not gold:
            return 0.0
        answer = parse(response, parsing_timeout=timeout)
        if not answer:
            return 0.0
        return 1.0 if verify(gold, answer, timeout_seconds=timeout) else 0.0
    except Exception:  # noqa: BLE001 - math_verify/sympy can raise almost anything on odd input
        return 0.0
