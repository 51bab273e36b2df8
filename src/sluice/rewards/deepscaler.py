"""DeepScaleR's reward: only the answer after the reasoning block (``...</think>``) counts.

A response whose reasoning never closes scores 0.0 whatever it contains, so a model cannot earn reward by
leaving a correct-looking number inside unfinished reasoning. The answer is compared with ``math_reward``.
"""

from __future__ import annotations

from typing import Any

from sluice.rewards.math import math_reward

THINK_END = "</think>"


def final_answer(response: str) -> str | None:
    """The text after the last ``</think>``, or None when the reasoning block never closed.

    >>> final_answer("<think>2+2 is 4</think> The answer is 4.")
    ' The answer is 4.'
    >>> final_answer("<think>still thinking") is None
    True
    """
    if THINK_END not in response:
        return None
    return response.rsplit(THINK_END, 1)[1]


def deepscaler_reward(response: str, label: Any) -> float:
    """1.0 if the answer after the reasoning is mathematically equal to the label, else 0.0.

    >>> deepscaler_reward("<think>1/2 = 0.5</think> so \\\\boxed{\\\\frac{1}{2}}", "0.5")
    1.0
    >>> deepscaler_reward("<think>the answer is 0.5", "0.5")
    0.0
    >>> deepscaler_reward("<think>maybe 0.5?</think> \\\\boxed{0.25}", "0.5")
    0.0
    """
    if label is None:
        raise ValueError("deepscaler_reward needs a label, got None (is --label-key set?)")
    answer = final_answer(response)
    return 0.0 if answer is None else math_reward(answer, label)
