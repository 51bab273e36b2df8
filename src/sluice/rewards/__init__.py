"""Reward functions: the built-in hub (``--rm-type``), custom ones by path, and concurrent scoring."""

from sluice.rewards.boxed import boxed_exact, boxed_math, extract_boxed
from sluice.rewards.contract import GroupRewardFn, RewardFn, RewardValue
from sluice.rewards.deepscaler import deepscaler_reward
from sluice.rewards.exact import exact_match
from sluice.rewards.f1 import token_f1
from sluice.rewards.math import math_reward
from sluice.rewards.random_rm import RandomReward
from sluice.rewards.registry import BUILTIN_REWARDS, RewardSettings, builtin_reward, get_group_reward_fn, get_reward_fn
from sluice.rewards.remote import RemoteReward
from sluice.rewards.scoring import score_group, score_sample, score_samples

__all__ = [
    "BUILTIN_REWARDS",
    "GroupRewardFn",
    "RandomReward",
    "RemoteReward",
    "RewardFn",
    "RewardSettings",
    "RewardValue",
    "boxed_exact",
    "boxed_math",
    "builtin_reward",
    "deepscaler_reward",
    "exact_match",
    "extract_boxed",
    "get_group_reward_fn",
    "get_reward_fn",
    "math_reward",
    "score_group",
    "score_sample",
    "score_samples",
    "token_f1",
]
