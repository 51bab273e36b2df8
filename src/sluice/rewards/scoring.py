"""Scoring many samples concurrently without letting one bad sample take down the rollout."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sluice.rewards.contract import RewardFn
from sluice.types import Sample, Status


async def score_samples(
    reward_fn: RewardFn,
    samples: Sequence[Sample],
    max_concurrency: int,
    timeout_s: float | None = None,
) -> Sequence[Sample]:
    """Set ``sample.reward`` on every sample, at most ``max_concurrency`` reward calls in flight.

    A reward function that raises (or exceeds ``timeout_s``) fails only its own sample: reward 0.0, status
    FAILED (so training drops it) and the error text in ``metadata['reward_error']`` for debugging. The
    timeout exists because math_verify cannot time itself out in worker threads; note that it frees the
    rollout but cannot stop a sync function's thread, which runs on to completion in the background.
    Returns ``samples`` for chaining.
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    gate = asyncio.Semaphore(max_concurrency)

    async def score_one(sample: Sample) -> None:
        async with gate:
            try:
                sample.reward = await asyncio.wait_for(reward_fn(sample), timeout_s)
            except Exception as exc:  # noqa: BLE001 - any user-code error is confined to its sample
                sample.reward = 0.0
                sample.status = Status.FAILED
                sample.metadata["reward_error"] = f"{type(exc).__name__}: {exc}"

    await asyncio.gather(*(score_one(sample) for sample in samples))
    return samples
