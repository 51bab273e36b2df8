"""``--custom-rm-path`` (and ``--group-rm``): a user reward function adapted to ``RewardFn`` / ``GroupRewardFn``.

Accepted forms, sync or async (a sync function runs in a worker thread, so a slow scorer does not stall the
event loop that drives generation):

- per sample: sluice's ``fn(sample) -> float | dict``, slime's ``fn(args, sample)``;
- with ``--group-rm``: sluice's ``fn(samples) -> list[float | dict]``, slime's ``fn(args, samples)``: one call per
  prompt group, for rewards that compare the responses of a group (pairwise judges, diversity bonuses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sluice.plugins import Contract, Plugin, check_form, load_plugin
from sluice.rewards.contract import GroupRewardFn, RewardFn, RewardValue, as_reward_value
from sluice.types import Sample

FLAG = "--custom-rm-path"
REWARD_CONTRACT = Contract(FLAG, "[async] fn(sample: Sample) -> float | dict[str, float]", 1,
                           "[async] fn(args, sample) -> float | dict", 2)
GROUP_REWARD_CONTRACT = Contract(FLAG + " with --group-rm",
                                 "[async] fn(samples: list[Sample]) -> list[float | dict[str, float]]", 1,
                                 "[async] fn(args, samples) -> list[float | dict]", 2)


def adapt(plugin: Plugin, slime_args: Any = None) -> RewardFn:
    """``plugin`` as an async ``(sample) -> float | dict`` with its result coerced to floats."""

    async def reward(sample: Sample) -> RewardValue:
        return as_reward_value(await plugin.call(slime_args, sample), plugin.path)

    reward.__name__ = reward.__qualname__ = plugin.name
    reward.plugin_path = plugin.path  # how failure reports name the function: as the user wrote it
    return reward


def adapt_group(plugin: Plugin, slime_args: Any = None) -> GroupRewardFn:
    """``plugin`` as an async ``(samples) -> list[float | dict]``, one value per sample, in order."""

    async def group_reward(samples: list[Sample]) -> list[RewardValue]:
        values = await plugin.call(slime_args, samples)
        if not isinstance(values, (list, tuple)) or len(values) != len(samples):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise TypeError(f"{plugin.path}: a group reward must return one value per sample "
                            f"({len(samples)}), got {got}")
        return [as_reward_value(v, plugin.path) for v in values]

    group_reward.__name__ = group_reward.__qualname__ = plugin.name
    group_reward.plugin_path = plugin.path
    return group_reward


def load_custom_reward(path: str, slime_args: Any = None) -> RewardFn:
    """The per-sample reward function at ``path``, adapted to ``RewardFn``."""
    return adapt(load_plugin(path, REWARD_CONTRACT), slime_args)


def load_group_reward(path: str, slime_args: Any = None) -> GroupRewardFn:
    """The group reward function at ``path`` (``--group-rm``), adapted to ``GroupRewardFn``."""
    return adapt_group(load_plugin(path, GROUP_REWARD_CONTRACT), slime_args)


def as_async_reward(fn: Callable[[Sample], Any], path: str = "reward") -> RewardFn:
    """A plain ``(sample) -> value`` callable (sync or async) as a ``RewardFn``; for tests and examples."""
    return adapt(check_form(fn, REWARD_CONTRACT, path))
