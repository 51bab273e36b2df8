"""One rollout step: the request a rollout function gets, what it returns, the built-in rollouts, and loading
``--rollout-function-path``.

Contract: ``async rollout(request: RolloutRequest) -> list[SampleGroup] | RolloutOutput`` (a sync function is
run in a daemon thread). It draws prompts from ``request.source`` and generates through ``request.manager``,
or does anything else that yields scored groups. slime's ``generate_rollout(args, rollout_id, data_source,
evaluation=False) -> list[list[Sample]]`` (or an object with ``.samples`` and ``.metrics``) gets a data source
with slime's ``get_samples(n)`` and, as ``args.sglang_router_ip/port``, the gateway's SGLang ``/generate``.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sluice.plugins import Contract, load_plugin
from sluice.rollout.dynamic_sampling import GroupFilter, sample_filtered_groups
from sluice.rollout.manager import RolloutManager
from sluice.types import Sample, SampleGroup, SamplingParams

FLAG = "--rollout-function-path"
CONTRACT = Contract(FLAG, "async fn(request: RolloutRequest) -> list[SampleGroup] | RolloutOutput", 1,
                    "fn(args, rollout_id, data_source, evaluation=False) -> list[list[Sample]]", 3)


class PromptBatches(Protocol):
    """The part of a prompt source a rollout uses."""

    def next_batch(self, n: int) -> list[Sample]: ...


@dataclass
class RolloutRequest:
    """One rollout step, as a rollout function receives it."""

    rollout_id: int  # 0-based step number
    num_groups: int  # --rollout-batch-size: prompt groups the step should return
    n_samples: int  # --n-samples-per-prompt
    sampling_params: SamplingParams  # the run's sampling settings; max_new_tokens = --rollout-max-response-len
    first_index: int  # Sample.index of the step's first sample; indices stay unique in the run from there
    source: PromptBatches  # next_batch(n) -> prompt samples (deep copies)
    manager: RolloutManager  # generate_groups / stream_groups; ctx.client, ctx.tokenizer; the reward functions


@dataclass
class RolloutOutput:
    groups: list[SampleGroup]  # scored groups, in the order they are trained
    metrics: dict[str, float] = field(default_factory=dict)  # logged with the step (rollout/...)


RolloutFn = Callable[[RolloutRequest], Awaitable[RolloutOutput]]


async def plain_rollout(request: RolloutRequest) -> RolloutOutput:
    """The default: the next ``num_groups`` prompts, ``n_samples`` responses each."""
    prompts = request.source.next_batch(request.num_groups)
    return RolloutOutput(await request.manager.generate_groups(
        prompts, request.n_samples, request.sampling_params, first_index=request.first_index))


def filtered_rollout(over_sampling_batch_size: int, group_filter: GroupFilter | None) -> RolloutFn:
    """DAPO dynamic sampling (``--over-sampling-batch-size``, ``--dynamic-sampling-filter-path``)."""

    async def rollout(request: RolloutRequest) -> RolloutOutput:
        outcome = await sample_filtered_groups(
            request.manager, request.source, request.num_groups, over_sampling_batch_size, request.n_samples,
            request.sampling_params, group_filter, first_index=request.first_index)
        return RolloutOutput(outcome.groups, outcome.metrics())

    return rollout


def as_groups(value: Any, source: str) -> list[SampleGroup]:
    """``list[SampleGroup]`` or slime's ``list[list[Sample]]`` as groups; anything else raises naming ``source``."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{source} returned a {type(value).__name__}; expected a list of sample groups")
    groups = []
    for item in value:
        samples = item.samples if isinstance(item, SampleGroup) else item
        if not isinstance(samples, (list, tuple)) or not all(isinstance(s, Sample) for s in samples):
            raise TypeError(f"{source} returned {type(item).__name__} in its list; expected SampleGroup or "
                            "list[Sample]")
        groups.append(SampleGroup(list(samples)))
    return groups


def as_rollout_output(value: Any, source: str) -> RolloutOutput:
    if isinstance(value, RolloutOutput):
        return value
    if hasattr(value, "samples"):  # slime's RolloutFnTrainOutput
        return RolloutOutput(as_groups(value.samples, source), dict(getattr(value, "metrics", None) or {}))
    return RolloutOutput(as_groups(value, source))


class SlimeDataSource:
    """A prompt source seen through slime's ``get_samples(n)``: n groups of ``n_samples`` fresh copies."""

    def __init__(self, source: PromptBatches, n_samples: int, first_index: int = 0):
        self.source, self.n_samples, self.next_index = source, n_samples, first_index

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        groups = []
        for group_index, prompt in enumerate(self.source.next_batch(num_samples)):
            members = []
            for _ in range(self.n_samples):
                sample = copy.deepcopy(prompt)
                sample.group_index, sample.index = group_index, self.next_index
                self.next_index += 1
                members.append(sample)
            groups.append(members)
        return groups

    def add_samples(self, samples: list[list[Sample]]) -> None:
        raise NotImplementedError("sluice's prompt source takes no samples back (no partial-rollout buffer)")


def load_rollout_fn(path: str, slime_args: Any = None) -> RolloutFn:
    """The rollout function at ``path`` as ``(request) -> RolloutOutput``; errors name the flag."""
    plugin = load_plugin(path, CONTRACT)

    async def rollout(request: RolloutRequest) -> RolloutOutput:
        if plugin.slime_form:
            data_source = SlimeDataSource(request.source, request.n_samples, request.first_index)
            value = await plugin.call(slime_args, request.rollout_id, data_source, False)
        else:
            value = await plugin.call(None, request)
        return as_rollout_output(value, path)

    rollout.__name__ = rollout.__qualname__ = plugin.name
    rollout.slime_form = plugin.slime_form
    return rollout
