"""Scoring samples concurrently without letting one bad sample (or one hung scorer) take down the rollout.

Every reward call runs under a timeout. A call that raises or times out fails only its own sample: reward 0.0,
status FAILED (training drops it), the error in ``metadata['reward_error']``, and the error handed to
``on_failure`` (the rollout counts them, rollout/plugin_failures.py), or, without one, one log line naming the
sample. A timeout frees the rollout but cannot stop a sync scorer's worker thread, which runs on in the
background; a coroutine is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from sluice.rewards.contract import GroupRewardFn, RewardFn
from sluice.types import Sample, Status

log = logging.getLogger("sluice.rewards")

# Called with each failed sample and the error that failed it.
OnFailure = Callable[[Sample, BaseException], None]


def log_failure(sample: Sample, error: BaseException) -> None:
    """The default ``on_failure``: one warning naming the sample."""
    log.warning("reward failed for sample %d (group %d): %s", sample.index, sample.group_index,
                sample.metadata["reward_error"])


def fail_reward(sample: Sample, error: BaseException, on_failure: OnFailure | None = None) -> None:
    """Mark ``sample`` FAILED by its reward function, with the error recorded and reported."""
    text = "TimeoutError: the reward call timed out" if isinstance(error, TimeoutError) and not str(error) \
        else f"{type(error).__name__}: {error}"
    sample.reward = 0.0
    sample.status = Status.FAILED
    sample.metadata["reward_error"] = text
    (on_failure or log_failure)(sample, error)


async def score_sample(reward_fn: RewardFn, sample: Sample, timeout_s: float | None = None,
                       on_failure: OnFailure | None = None) -> None:
    """Set ``sample.reward``; failures and timeouts fail the sample (see the module docstring)."""
    try:
        sample.reward = await asyncio.wait_for(reward_fn(sample), timeout_s)
    except Exception as error:  # noqa: BLE001 - any user-code error is confined to its sample
        fail_reward(sample, error, on_failure)


async def score_group(group_fn: GroupRewardFn, samples: list[Sample], timeout_s: float | None = None,
                      on_failure: OnFailure | None = None) -> None:
    """``--group-rm``: one call for the group's samples; a failure fails every sample of the group."""
    try:
        values = await asyncio.wait_for(group_fn(samples), timeout_s)
    except Exception as error:  # noqa: BLE001
        for sample in samples:
            fail_reward(sample, error, on_failure)
        return
    for sample, value in zip(samples, values):
        sample.reward = value


async def score_samples(
    reward_fn: RewardFn,
    samples: Sequence[Sample],
    max_concurrency: int,
    timeout_s: float | None = None,
) -> Sequence[Sample]:
    """Set ``sample.reward`` on every sample, at most ``max_concurrency`` reward calls in flight.

    Returns ``samples`` for chaining.
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    gate = asyncio.Semaphore(max_concurrency)

    async def score_one(sample: Sample) -> None:
        async with gate:
            await score_sample(reward_fn, sample, timeout_s)

    await asyncio.gather(*(score_one(sample) for sample in samples))
    return samples
