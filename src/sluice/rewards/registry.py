"""``--rm-type`` name -> reward function. Adding a built-in reward: one file, one line in ``TEXT_REWARDS`` or
``SAMPLE_REWARDS``, and its name in ``sluice.config.sections.BUILTIN_REWARDS``.

Text rewards score ``(response, label)``; each with a ``boxed`` rule also exists as ``boxed_<name>``, which
scores only the last ``\\boxed{...}`` answer. Sample rewards are built from the reward settings and see the
whole sample (a remote judge gets the prompt and metadata too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sluice.plugins import call_in_thread
from sluice.rewards.boxed import BOXED_PREFIX, boxed_variant
from sluice.rewards.contract import GroupRewardFn, RewardFn, RewardValue
from sluice.rewards.custom import load_custom_reward, load_group_reward
from sluice.rewards.deepscaler import deepscaler_reward
from sluice.rewards.exact import exact_match
from sluice.rewards.f1 import token_f1
from sluice.rewards.math import math_reward
from sluice.rewards.random_rm import RandomReward
from sluice.rewards.remote import RemoteReward
from sluice.types import Sample


@dataclass(frozen=True)
class TextReward:
    score: Callable[[str, Any], float]
    # CPU-heavy scorers (sympy) run in a worker thread so they do not stall the event loop;
    # cheap string compares run inline, where a thread hop would cost more than the work.
    in_thread: bool
    # How the content of a \boxed{} is handed to ``score`` for the boxed_ variant; None: no boxed_ variant.
    boxed: Callable[[str], str] | None = None


@dataclass(frozen=True)
class RewardSettings:
    """What built-in sample rewards are configured with (from the reward section of the config)."""

    rm_url: str | None = None
    rm_timeout: float = 30.0
    rm_max_retries: int = 3
    rm_max_connections: int = 64
    seed: int = 0


def _unchanged(answer: str) -> str:
    return answer


def _rebox(answer: str) -> str:
    return "\\boxed{" + answer + "}"  # math_verify parses a bare LaTeX answer only inside a box or $...$


def _remote(settings: RewardSettings) -> RewardFn:
    if not settings.rm_url:
        raise ValueError("--rm-type remote_rm needs --rm-url (the reward service's URL)")
    return RemoteReward(settings.rm_url, settings.rm_timeout, settings.rm_max_retries, settings.rm_max_connections)


TEXT_REWARDS: MappingProxyType[str, TextReward] = MappingProxyType({
    "exact": TextReward(exact_match, in_thread=False, boxed=_unchanged),
    "math": TextReward(math_reward, in_thread=True, boxed=_rebox),
    "f1": TextReward(token_f1, in_thread=False, boxed=_unchanged),
    "deepscaler": TextReward(deepscaler_reward, in_thread=True),
})
SAMPLE_REWARDS: MappingProxyType[str, Callable[[RewardSettings], RewardFn]] = MappingProxyType({
    "remote_rm": _remote,
    "random": lambda settings: RandomReward(seed=settings.seed),
})
BUILTIN_REWARDS: tuple[str, ...] = (
    *TEXT_REWARDS, *(BOXED_PREFIX + name for name, r in TEXT_REWARDS.items() if r.boxed), *SAMPLE_REWARDS)


def _text_reward(name: str, score: Callable[[str, Any], float], in_thread: bool) -> RewardFn:
    async def reward(sample: Sample) -> RewardValue:
        if in_thread:
            return await call_in_thread(score, sample.response, sample.label)
        return score(sample.response, sample.label)

    reward.__name__ = reward.__qualname__ = f"{name}_reward"
    return reward


def builtin_reward(rm_type: str, settings: RewardSettings = RewardSettings()) -> RewardFn:
    """The built-in reward named ``rm_type``; ValueError lists the valid names."""
    if rm_type in SAMPLE_REWARDS:
        return SAMPLE_REWARDS[rm_type](settings)
    base = rm_type.removeprefix(BOXED_PREFIX)
    text = TEXT_REWARDS.get(base)
    if text is None or (base != rm_type and text.boxed is None):
        raise ValueError(f"unknown --rm-type {rm_type!r}; valid built-in rewards are: {', '.join(BUILTIN_REWARDS)}")
    score = text.score if base == rm_type else boxed_variant(text.score, text.boxed, rm_type)
    return _text_reward(rm_type, score, text.in_thread)


def get_reward_fn(rm_type: str | None, custom_rm_path: str | None = None, slime_args: Any = None,
                  settings: RewardSettings = RewardSettings()) -> RewardFn:
    """The async per-sample reward function of a run.

    ``custom_rm_path`` is checked first (``sluice train`` rejects setting both). ``slime_args`` is what a
    slime-style ``(args, sample)`` function receives as ``args``: the run's flags as a namespace.
    """
    if custom_rm_path:
        return load_custom_reward(custom_rm_path, slime_args)
    if not rm_type:
        raise ValueError(f"no reward function: set --rm-type (one of: {', '.join(BUILTIN_REWARDS)}) or "
                         "--custom-rm-path")
    return builtin_reward(rm_type, settings)


def get_group_reward_fn(custom_rm_path: str, slime_args: Any = None) -> GroupRewardFn:
    """``--group-rm``: the group reward function at ``custom_rm_path``."""
    return load_group_reward(custom_rm_path, slime_args)
