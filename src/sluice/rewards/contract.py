"""The shapes every reward function has once loaded, whatever form the user wrote it in."""

from __future__ import annotations

import numbers
from collections.abc import Awaitable, Callable

from sluice.types import Sample

RewardValue = float | dict[str, float]
# Async so that rewards which call a remote judge or sandbox overlap with each other and with generation.
RewardFn = Callable[[Sample], Awaitable[RewardValue]]
# --group-rm: one call per prompt group, one value per sample in the order given.
GroupRewardFn = Callable[[list[Sample]], Awaitable[list[RewardValue]]]


def as_reward_value(value: object, source: str) -> RewardValue:
    """Coerce what a reward function returned to a float or a dict of floats.

    User functions return ints, bools, numpy scalars or 0-d tensors as often as floats; those are converted
    here once, so downstream code (advantages, metrics) can rely on plain floats. Anything else is a bug in
    the reward function and raises with its name, which the rollout records on the sample.
    """
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out[str(key)] = _as_float(item, f"{source} returned a dict whose {key!r}")
        return out
    return _as_float(value, f"{source} returned a reward that")


def _as_float(value: object, what: str) -> float:
    # float() alone would accept the text "1.0" (and "nan"): a reward that returns text is a bug to report,
    # not a number to parse. bool, int, float and numpy scalars are numbers.Real; numpy's bool_ is not, and a
    # 0-d array or tensor holds its number behind ``item()``.
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        item = value.item()  # type: ignore[union-attr]
        if isinstance(item, numbers.Real):
            return float(item)
    raise TypeError(f"{what} is not a number: {value!r} ({type(value).__name__}); return an int, float or bool, "
                    "or a dict of them with the reward under --reward-key")
