"""``--rm-type random``: a coin flip per sample, for testing the pipeline without a real reward.

Seeded and order-free: the reward is a function of (seed, sample index, response), so concurrent scoring in
any order, or a re-run, gives the same rewards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sluice.types import Sample


@dataclass(frozen=True)
class RandomReward:
    """1.0 with probability ``p`` else 0.0, drawn from a generator seeded by the sample.

    >>> import asyncio
    >>> coin = RandomReward(seed=7)
    >>> sample = Sample(prompt="q", index=3, response="hello")
    >>> asyncio.run(coin(sample)) == asyncio.run(coin(sample))
    True
    >>> sorted({asyncio.run(coin(Sample(prompt="q", index=i))) for i in range(50)})
    [0.0, 1.0]
    """

    seed: int = 0
    p: float = 0.5

    async def __call__(self, sample: Sample) -> float:
        draw = random.Random(f"{self.seed}/{sample.index}/{sample.response}").random()
        return 1.0 if draw < self.p else 0.0
