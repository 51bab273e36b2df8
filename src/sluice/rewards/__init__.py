"""Reward functions: built-ins (exact, math, boxed_*), custom ones by dotted path, and batch scoring."""

from sluice.rewards.boxed import boxed_exact, boxed_math, extract_boxed
from sluice.rewards.exact import exact_match
from sluice.rewards.math import math_reward
from sluice.rewards.registry import BUILTIN_REWARDS, get_reward_fn
from sluice.rewards.scoring import score_samples
from sluice.rewards.contract import RewardFn, RewardValue

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardValue",
    "boxed_exact",
    "boxed_math",
    "exact_match",
    "extract_boxed",
    "get_reward_fn",
    "math_reward",
    "score_samples",
]
