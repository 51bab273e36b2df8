"""The shapes every reward function has once loaded, whatever form the user wrote it in."""

from __future__ import annotations

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
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not a number: {value!r} ({type(value).__name__})") from exc
