"""``--buffer-filter-path``: pick which finished groups of a rollout step are trained; the rest are dropped.

Contract: ``fn(groups: list[SampleGroup], num_groups: int) -> list[SampleGroup]`` (``num_groups`` is
--rollout-batch-size), e.g. keep the groups whose rewards vary most, or balance tasks. slime's ``fn(args,
rollout_id, buffer: list[list[Sample]], num_samples) -> list[list[Sample]]`` works too (its buffer is the
step's groups; sluice keeps no buffer across steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sluice.plugins import Contract, load_plugin
from sluice.rollout.step import as_groups
from sluice.types import SampleGroup

FLAG = "--buffer-filter-path"
CONTRACT = Contract(FLAG, "fn(groups: list[SampleGroup], num_groups: int) -> list[SampleGroup]", 2,
                    "fn(args, rollout_id, buffer: list[list[Sample]], num_samples: int) -> list[list[Sample]]", 4,
                    sync_only=True)

BufferFilter = Callable[[list[SampleGroup], int, int], list[SampleGroup]]  # (groups, num_groups, rollout_id)


def keep_first(groups: list[SampleGroup], num_groups: int) -> list[SampleGroup]:
    """The default: the first ``num_groups`` groups in the order the rollout returned them."""
    return groups[:num_groups]


def load_buffer_filter(path: str, slime_args: Any = None) -> BufferFilter:
    plugin = load_plugin(path, CONTRACT)

    def pick(groups: list[SampleGroup], num_groups: int, rollout_id: int) -> list[SampleGroup]:
        if plugin.slime_form:
            chosen = plugin.call_sync(slime_args, rollout_id, [list(g.samples) for g in groups], num_groups)
        else:
            chosen = plugin.call_sync(None, groups, num_groups)
        return as_groups(chosen, path)

    return pick
