"""DAPO dynamic sampling: generate prompt groups in rounds and keep those that pass a filter.

Each round draws ``over_sampling_batch_size`` prompts from the source, generates and scores their groups,
and keeps the groups the filter passes, until ``target`` groups are kept or ``max_rounds`` rounds have run.
Departures from DAPO, on purpose:

- kept groups beyond ``target`` are dropped (their prompts are spent); a later replay buffer may carry them over;
- after ``max_rounds`` rounds a short batch is trained on as it is (``num_kept_groups`` < target says so);
  if no group at all was kept, the last round's groups are used, so the step still runs (with no signal).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sluice.data import PromptSource
from sluice.rewards.custom import load_callable, takes_args_first
from sluice.rollout.manager import RolloutManager
from sluice.types import Sample, SampleGroup, SamplingParams

GroupFilter = Callable[[list[Sample]], bool]
MAX_GENERATION_ROUNDS = 8


def load_group_filter(path: str, slime_args: Any = None) -> GroupFilter:
    """The filter at dotted ``path``, as ``(group_samples) -> bool``.

    Accepts sluice's ``f(group_samples) -> bool`` and slime's ``f(args, samples)`` returning a bool or an
    object with ``.keep`` (slime's DynamicFilterOutput). Raises ImportError, TypeError or ValueError.
    """
    fn = load_callable(path)
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"filter {path!r} is async; a dynamic-sampling filter must be a plain function")
    leading: tuple[Any, ...] = (slime_args,) if takes_args_first(fn, path) else ()

    def keep(group_samples: list[Sample]) -> bool:
        result = fn(*leading, group_samples)
        return bool(getattr(result, "keep", result))

    return keep


@dataclass
class SamplingOutcome:
    """What dynamic sampling hands the trainer, with the counts behind it."""

    groups: list[SampleGroup]  # the kept groups, at most ``target``, group_index renumbered 0..len-1
    num_generation_rounds: int  # rounds of ``over_sampling_batch_size`` prompts generated
    num_generated_groups: int  # groups generated over all rounds
    num_passed_groups: int  # groups the filter kept, before the cut to ``target``

    def metrics(self) -> dict[str, float]:
        filtered = self.num_generated_groups - self.num_passed_groups
        return {
            "rollout/filtered_groups_frac": filtered / max(self.num_generated_groups, 1),
            "rollout/num_generation_rounds": float(self.num_generation_rounds),
            # groups that passed the filter and are trained on (0 when the step fell back to unfiltered groups)
            "rollout/num_kept_groups": float(min(self.num_passed_groups, len(self.groups))),
        }


async def sample_filtered_groups(
    manager: RolloutManager, source: PromptSource, target: int, over_sampling_batch_size: int, n_samples: int,
    sampling_params: SamplingParams, group_filter: GroupFilter | None, first_index: int = 0,
    max_rounds: int = MAX_GENERATION_ROUNDS,
) -> SamplingOutcome:
    """Round after round until ``target`` groups pass ``group_filter`` (None: every group passes)."""
    kept: list[SampleGroup] = []
    last_round: list[SampleGroup] = []
    num_rounds = num_generated = 0
    while len(kept) < target and num_rounds < max_rounds:
        prompts = source.next_batch(over_sampling_batch_size)
        last_round = await manager.generate_groups(prompts, n_samples, sampling_params)
        num_rounds += 1
        num_generated += len(last_round)
        kept.extend(g for g in last_round if group_filter is None or group_filter(g.samples))
    num_passed = len(kept)
    chosen = kept[:target] if kept else last_round[:target]
    _renumber(chosen, n_samples, first_index)
    return SamplingOutcome(chosen, num_rounds, num_generated, num_passed)


def _renumber(groups: list[SampleGroup], n_samples: int, first_index: int) -> None:
    """Positions in the rollout, as one undivided round would have numbered them (Sample.index stays unique)."""
    for group_index, group in enumerate(groups):
        for k, sample in enumerate(group.samples):
            sample.group_index, sample.index = group_index, first_index + group_index * n_samples + k
