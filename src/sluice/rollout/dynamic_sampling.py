"""DAPO dynamic sampling: generate prompt groups in rounds and keep those that pass a filter.

Each round draws ``over_sampling_batch_size`` prompts from the source and generates their groups concurrently;
groups are filtered as they finish, and once ``target`` groups have passed, the batch is full: groups of the
round still generating or scoring are cancelled (their engine requests aborted), not waited for. Rounds repeat
until ``target`` groups passed or ``max_rounds`` rounds ran. Departures from DAPO, on purpose:

- which groups fill the batch depends on which finish first (as with slime's over-sampling); the kept groups
  are then put back in prompt order, so the same set always trains in the same order;
- cancelled groups' prompts are spent (a later replay buffer may carry them over);
- after ``max_rounds`` rounds a short batch is trained on as it is (``num_kept_groups`` < target says so);
  if no group at all was kept, the last round's groups are used, so the step still runs (with no signal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sluice.data import PromptSource
from sluice.plugins import Contract, load_plugin
from sluice.rollout.manager import RolloutManager
from sluice.rollout.seeds import TRAIN_STREAM
from sluice.types import Sample, SampleGroup, SamplingParams

GroupFilter = Callable[[list[Sample]], bool]
MAX_GENERATION_ROUNDS = 8
FILTER_CONTRACT = Contract("--dynamic-sampling-filter-path", "fn(group_samples: list[Sample]) -> bool", 1,
                           "fn(args, samples) -> bool | DynamicFilterOutput(keep, reason)", 2, sync_only=True)


def load_group_filter(path: str, slime_args: Any = None) -> GroupFilter:
    """The filter at ``path``, as ``(group_samples) -> bool``; raises PluginError naming the flag.

    Accepts sluice's ``f(group_samples) -> bool`` and slime's ``f(args, samples)`` returning a bool or an
    object with ``.keep`` (slime's DynamicFilterOutput).
    """
    plugin = load_plugin(path, FILTER_CONTRACT)

    def keep(group_samples: list[Sample]) -> bool:
        result = plugin.call_sync(slime_args, group_samples)
        return bool(getattr(result, "keep", result))

    return keep


@dataclass
class SamplingOutcome:
    """What dynamic sampling hands the trainer, with the counts behind it."""

    groups: list[SampleGroup]  # the kept groups, at most ``target``, group_index renumbered 0..len-1
    num_generation_rounds: int  # rounds of ``over_sampling_batch_size`` prompts generated
    num_generated_groups: int  # groups that finished generating and scoring over all rounds
    num_passed_groups: int  # groups the filter kept, before the cut to ``target``
    num_cancelled_groups: int = 0  # groups cancelled unfinished because the batch was full

    def metrics(self) -> dict[str, float]:
        filtered = self.num_generated_groups - self.num_passed_groups
        return {
            "rollout/filtered_groups_frac": filtered / max(self.num_generated_groups, 1),
            "rollout/num_generation_rounds": float(self.num_generation_rounds),
            # groups that passed the filter and are trained on (0 when the step fell back to unfiltered groups)
            "rollout/num_kept_groups": float(min(self.num_passed_groups, len(self.groups))),
            "rollout/num_cancelled_groups": float(self.num_cancelled_groups),
        }


async def sample_filtered_groups(
    manager: RolloutManager, source: PromptSource, target: int, over_sampling_batch_size: int, n_samples: int,
    sampling_params: SamplingParams, group_filter: GroupFilter | None, first_index: int = 0,
    max_rounds: int = MAX_GENERATION_ROUNDS,
) -> SamplingOutcome:
    """Round after round until ``target`` groups pass ``group_filter`` (None: every group passes)."""
    kept: list[tuple[int, SampleGroup]] = []  # (round, group) in the order they passed
    last_round: list[SampleGroup] = []
    num_rounds = num_generated = num_cancelled = 0
    while len(kept) < target and num_rounds < max_rounds:
        prompts = source.next_batch(over_sampling_batch_size)
        finished: list[SampleGroup] = []
        # each round numbers its samples from 0: a stream of seeds per step and round keeps their noise apart
        round_manager = manager.seeded_as(f"{TRAIN_STREAM}/dynamic/{first_index}/{num_rounds}")
        async with contextlib.aclosing(round_manager.stream_groups(prompts, n_samples, sampling_params)) as stream:
            async for group in stream:
                finished.append(group)
                if group_filter is None or group_filter(group.samples):
                    kept.append((num_rounds, group))
                    if len(kept) >= target:
                        break  # the batch is full: closing the stream cancels the rest of the round
        num_rounds += 1
        num_generated += len(finished)
        num_cancelled += len(prompts) - len(finished)
        last_round = sorted(finished, key=lambda g: g.samples[0].group_index if g.samples else 0)
    num_passed = len(kept)
    in_prompt_order = [g for _, g in sorted(kept[:target], key=lambda item: (item[0], _position(item[1])))]
    chosen = in_prompt_order if kept else last_round[:target]
    _renumber(chosen, n_samples, first_index)
    return SamplingOutcome(chosen, num_rounds, num_generated, num_passed, num_cancelled)


def _position(group: SampleGroup) -> int:
    return group.samples[0].group_index if group.samples else 0


def _renumber(groups: list[SampleGroup], n_samples: int, first_index: int) -> None:
    """Positions in the rollout, as one undivided round would have numbered them (Sample.index stays unique)."""
    for group_index, group in enumerate(groups):
        for k, sample in enumerate(group.samples):
            sample.group_index, sample.index = group_index, first_index + group_index * n_samples + k
