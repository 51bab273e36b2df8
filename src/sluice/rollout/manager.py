"""RolloutManager: turns prompt samples into scored groups of responses through the engine client.

Each sample is a pipeline of its own: generate (at most ``max_concurrency`` generate calls in flight), then
score (at most ``max_concurrency`` reward calls in flight, each under ``reward_timeout_s``), so rewards of early
samples overlap with the generation of later ones. With a group reward (``--group-rm``) a group is scored once
all its samples are generated. ``generate_groups`` waits for every group; ``stream_groups`` yields groups as they
finish and, when the caller stops reading (the batch is full), cancels whatever is still generating or scoring:
engine requests are aborted and reward coroutines cancelled, never awaited to their timeouts.

A generate or reward function that raises fails its sample; ``failures`` shows the first traceback of each
function and error type and counts the rest, for one line per step (``failures.flush()``, called by the caller
that closes the step).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from sluice.engine.clients.protocol import EngineUnavailable
from sluice.rewards import GroupRewardFn, RewardFn, score_group, score_sample
from sluice.rewards.overlong import OverlongShaping
from sluice.rollout.generate import GenerateContext, generate_single_turn
from sluice.rollout.plugin_failures import PluginFailures, function_name
from sluice.rollout.seeds import RolloutSeeds
from sluice.types import Sample, SampleGroup, SamplingParams, Status

MAX_ENGINE_LOSSES = 3  # a sample whose engine is lost more often than this fails (and counts against the run)

GenerateFn = Callable[[Sample, SamplingParams, GenerateContext], Awaitable["Sample | list[Sample]"]]
log = logging.getLogger("sluice.rollout")


@dataclass
class _Gates:
    """The concurrency bounds of one generate_groups / stream_groups call (created on its event loop)."""

    generate: asyncio.Semaphore
    reward: asyncio.Semaphore


@dataclass
class RolloutManager:
    ctx: GenerateContext
    reward_fn: RewardFn | None  # None: the generate function sets every reward itself (an agent's own score)
    max_concurrency: int = 256
    generate_fn: GenerateFn = generate_single_turn
    reward_key: str | None = None
    overlong: OverlongShaping | None = None  # DAPO soft overlong punishment of training rollouts
    group_reward_fn: GroupRewardFn | None = None  # --group-rm: replaces reward_fn, one call per group
    reward_timeout_s: float | None = None  # per reward call; None: no limit
    # called when a request lost its engine (a dead or hung process); the sample is then generated again
    recover_engines: Callable[[], Awaitable[None]] | None = None
    # --rollout-seed: every sample's requests carry a seed derived from it and Sample.index (seeds.py); None: the
    # requests carry the seed of the sampling params they are given, if any
    seeds: RolloutSeeds | None = None
    failures: PluginFailures = field(default_factory=PluginFailures)  # errors of the generate and reward functions

    async def generate_groups(
        self, prompts: list[Sample], n_samples: int, sampling_params: SamplingParams, first_index: int = 0,
        shape_rewards: bool = True,
    ) -> list[SampleGroup]:
        """n_samples responses per prompt, generated concurrently and scored; one group per prompt, in order.

        ``shape_rewards=False`` (evaluation) leaves the rewards as scored, without the overlong penalty.
        """
        gates = self._gates()
        return list(await asyncio.gather(*(
            self._group(prompt, group_index, n_samples, sampling_params, first_index, shape_rewards, gates)
            for group_index, prompt in enumerate(prompts))))

    async def stream_groups(
        self, prompts: list[Sample], n_samples: int, sampling_params: SamplingParams, first_index: int = 0,
        shape_rewards: bool = True,
    ) -> AsyncIterator[SampleGroup]:
        """Groups in the order they finish; ``group_index`` is the prompt's position in ``prompts``.

        Close the iterator (``contextlib.aclosing``) to stop early: groups still in flight are cancelled.
        """
        gates = self._gates()
        tasks = [asyncio.ensure_future(self._group(prompt, group_index, n_samples, sampling_params, first_index,
                                                   shape_rewards, gates))
                 for group_index, prompt in enumerate(prompts)]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:
            await cancel_tasks(tasks)

    async def continue_group(self, group: SampleGroup, sampling_params: SamplingParams, gates: _Gates | None = None,
                             shape_rewards: bool = True) -> SampleGroup:
        """Generate and score the samples of a buffer group that are not done yet (pending, or aborted with their
        tokens so far, from a partial rollout); finished samples are kept as they are. ``gates`` shares the
        concurrency bounds across groups (``new_gates()``); the group comes back in place, numbered by group_id."""
        gates = gates or self._gates()
        n_samples = len(group.samples)
        todo = []
        for k, sample in enumerate(group.samples):
            sample.group_index = max(group.group_id, 0)  # the buffer's number, as the sample index uses
            if group.group_id >= 0:
                sample.index = group.group_id * n_samples + k
            if sample.status in (Status.PENDING, Status.ABORTED):
                if sample.status == Status.ABORTED and not getattr(self.generate_fn, "resumes_partial", False):
                    _restart(sample)  # a generate function that cannot continue a response starts it again
                todo.append(sample)
        outputs = await asyncio.gather(*(self._sample(s, sampling_params, gates, score_aborted=False) for s in todo))
        produced = iter(outputs)
        pending = {id(s) for s in todo}
        samples = []
        for sample in group.samples:
            samples += next(produced) if id(sample) in pending else [sample]
        group.samples = samples
        if any(s.status == Status.ABORTED for s in samples):
            return group  # the caller requeues it; rewards come when every sample is done
        await self._finish_group(samples, shape_rewards, gates)
        return group

    def seeded_as(self, stream: str) -> RolloutManager:
        """This manager with request seeds from another stream (seeds.py): evaluation, dynamic sampling rounds."""
        return dataclasses.replace(self, seeds=self.seeds.within(stream)) if self.seeds is not None else self

    def new_gates(self) -> _Gates:
        """Concurrency bounds to share between continue_group calls (create on the event loop that uses them)."""
        return self._gates()

    def _gates(self) -> _Gates:
        return _Gates(asyncio.Semaphore(self.max_concurrency), asyncio.Semaphore(self.max_concurrency))

    async def _group(self, prompt: Sample, group_index: int, n_samples: int, params: SamplingParams,
                     first_index: int, shape_rewards: bool, gates: _Gates) -> SampleGroup:
        members = []
        for k in range(n_samples):
            sample = copy.deepcopy(prompt)
            sample.group_index, sample.index = group_index, first_index + group_index * n_samples + k
            members.append(sample)
        outputs = await asyncio.gather(*(self._sample(s, params, gates) for s in members))
        samples = [s for out in outputs for s in out]
        for sample in samples:  # fan-out siblings belong to the group of the prompt that made them
            sample.group_index = group_index
        await self._finish_group(samples, shape_rewards, gates)
        return SampleGroup(samples)

    async def _finish_group(self, samples: list[Sample], shape_rewards: bool, gates: _Gates) -> None:
        """A generated group's group reward (--group-rm) and overlong shaping."""
        if self.group_reward_fn is not None:
            pending = [s for s in samples if s.status != Status.FAILED and s.reward is None]
            if pending:
                async with gates.reward:
                    await score_group(self.group_reward_fn, pending, self.reward_timeout_s,
                                      self._reward_failed(self.group_reward_fn, "group reward fn"))
        if shape_rewards and self.overlong is not None:
            self.overlong.apply(samples)

    async def _sample(self, sample: Sample, params: SamplingParams, gates: _Gates,
                      score_aborted: bool = True) -> list[Sample]:
        if self.seeds is not None:  # a pure function of the sample: the same after a requeue, retry or resume
            params = self.seeds.params_for(params, sample.index)
        async with gates.generate:
            losses = 0
            while True:
                try:
                    out = await self.generate_fn(sample, params, self.ctx)
                    break
                except EngineUnavailable as error:  # the engine died or hangs: not the sample's fault
                    losses += 1
                    if self.recover_engines is None or losses > MAX_ENGINE_LOSSES:
                        return [_failed(sample, "generate_error", f"engine unavailable ({losses}x): {error}")]
                    log.warning("sample %d (group %d): engine lost (%s); recovering and trying again",
                                sample.index, sample.group_index, error)
                    await self.recover_engines()
                    if not getattr(self.generate_fn, "resumes_partial", False):
                        _restart(sample)  # a multi-turn function may have left the sample part-way
                except Exception as error:  # a broken generate call fails its sample, not the rollout
                    sample.status = Status.FAILED
                    sample.metadata["generate_error"] = f"{type(error).__name__}: {error}"
                    self.failures.record(f"generate fn {function_name(self.generate_fn)}", error, sample)
                    return [sample]
        produced = out if isinstance(out, list) else [out]
        if self.group_reward_fn is None:
            await asyncio.gather(*(self._score(s, gates) for s in produced
                                   if score_aborted or s.status != Status.ABORTED))
        return produced

    async def _score(self, sample: Sample, gates: _Gates) -> None:
        if sample.status == Status.FAILED or sample.reward is not None:  # failed, or scored by the generate fn
            return
        if self.reward_fn is None:
            sample.status = Status.FAILED
            sample.metadata["reward_error"] = "no reward: the generate function set none and no reward function is set"
            log.warning("sample %d: %s", sample.index, sample.metadata["reward_error"])
            return
        async with gates.reward:
            await score_sample(self.reward_fn, sample, self.reward_timeout_s,
                               self._reward_failed(self.reward_fn, "reward fn"))

    def _reward_failed(self, fn: Callable, hook: str) -> Callable[[Sample, BaseException], None]:
        """The scorer's ``on_failure``: counted in ``failures`` under the function's name."""
        what = f"{hook} {function_name(fn)}"
        return lambda sample, error: self.failures.record(what, error, sample)

    def rewards(self, group: SampleGroup) -> list[float]:
        return [s.scalar_reward(self.reward_key) if s.reward is not None else 0.0 for s in group.samples]


def _failed(sample: Sample, key: str, message: str) -> Sample:
    sample.status = Status.FAILED
    sample.metadata[key] = message
    log.warning("generate failed for sample %d (group %d): %s", sample.index, sample.group_index, message)
    return sample


def _restart(sample: Sample) -> None:
    """Back to the bare prompt: the partial response is dropped."""
    sample.tokens, sample.response, sample.response_length = [], "", 0
    sample.loss_mask, sample.rollout_log_probs, sample.weight_versions = [], [], []
    sample.status = Status.PENDING


async def cancel_tasks(tasks: list[asyncio.Future]) -> None:
    """Cancel what is still running and wait only for the cancellations (immediate: nothing shields them)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

