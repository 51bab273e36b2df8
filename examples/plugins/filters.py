"""Group filters: --dynamic-sampling-filter-path (per group, during sampling) and --buffer-filter-path (which
finished groups are trained)."""

from __future__ import annotations

from sluice.types import Sample, SampleGroup


def some_right_some_wrong(group_samples: list[Sample]) -> bool:
    """--dynamic-sampling-filter-path: keep groups with at least one reward of 1 and one below 1."""
    rewards = [s.reward if isinstance(s.reward, (int, float)) else 0.0 for s in group_samples]
    return max(rewards) >= 1.0 > min(rewards)


def most_varied(groups: list[SampleGroup], num_groups: int) -> list[SampleGroup]:
    """--buffer-filter-path: train on the half of the groups whose rewards vary most (at least one group)."""
    def spread(group: SampleGroup) -> float:
        rewards = [s.reward if isinstance(s.reward, (int, float)) else 0.0 for s in group.samples]
        return max(rewards) - min(rewards)

    keep = max(1, min(num_groups, len(groups)) // 2)
    return sorted(groups, key=spread, reverse=True)[:keep]
