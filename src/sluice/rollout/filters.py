"""Built-in dynamic-sampling filters: ``(group_samples) -> bool``, True keeps the group.

Select one with ``--dynamic-sampling-filter-path sluice.rollout.filters.<name>``.
"""

from __future__ import annotations

from sluice.types import Sample


def drop_uniform_rewards(group_samples: list[Sample]) -> bool:
    """Keep a group whose rewards differ: when all agree, every GRPO advantage is 0 and the group teaches nothing.

    A sample without a reward (failed) counts as 0.0, as in training. Dict rewards are compared whole.
    """
    rewards = [0.0 if s.reward is None else s.reward for s in group_samples]
    return any(r != rewards[0] for r in rewards[1:])
