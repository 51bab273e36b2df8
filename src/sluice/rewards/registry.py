"""Picking the reward function of a run from ``--rm-type`` / ``--custom-rm-path``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sluice.rewards.boxed import boxed_exact, boxed_math
from sluice.rewards.custom import load_custom_reward
from sluice.rewards.exact import exact_match
from sluice.rewards.math import math_reward
from sluice.rewards.contract import RewardFn, RewardValue
from sluice.types import Sample


@dataclass(frozen=True)
class _Builtin:
    fn: Callable[[str, Any], float]
    # CPU-heavy scorers (sympy) run in a worker thread so they do not stall the event loop;
    # cheap string compares run inline, where a thread hop would cost more than the work.
    in_thread: bool


BUILTIN_REWARDS: MappingProxyType[str, _Builtin] = MappingProxyType({
    "exact": _Builtin(exact_match, in_thread=False),
    "math": _Builtin(math_reward, in_thread=True),
    "boxed_exact": _Builtin(boxed_exact, in_thread=False),
    "boxed_math": _Builtin(boxed_math, in_thread=True),
})


def _builtin_reward(name: str, builtin: _Builtin) -> RewardFn:
    async def reward(sample: Sample) -> RewardValue:
        if builtin.in_thread:
            return await asyncio.to_thread(builtin.fn, sample.response, sample.label)
        return builtin.fn(sample.response, sample.label)

    reward.__name__ = reward.__qualname__ = f"{name}_reward"
    return reward


def get_reward_fn(rm_type: str | None, custom_rm_path: str | None = None, slime_args: Any = None) -> RewardFn:
    """The async reward function for a run.

    ``custom_rm_path`` is checked first (``sluice train`` rejects setting both). ``slime_args`` is what a
    slime-style ``(args, sample)`` function receives as ``args``: the run's flags as a namespace.
    """
    if custom_rm_path:
        return load_custom_reward(custom_rm_path, slime_args)
    valid = ", ".join(BUILTIN_REWARDS)
    if not rm_type:
        raise ValueError(f"no reward function: set --rm-type (one of: {valid}) or --custom-rm-path")
    builtin = BUILTIN_REWARDS.get(rm_type)
    if builtin is None:
        raise ValueError(f"unknown --rm-type {rm_type!r}; valid built-in rewards are: {valid}")
    return _builtin_reward(rm_type, builtin)
