"""Where each training step's batch comes from, finished by rollout/finish.py.

Synchronous loop (``generate``), one of, in this order of precedence:

- a replay of the groups --save-debug-rollout-data wrote (--load-debug-rollout-data; the prompt cursor stays);
- a rollout function (--rollout-function-path), given the buffer as its prompt source;
- DAPO dynamic sampling (rollout/dynamic_sampling.py), in rounds over the buffer's prompts;
- the default: the buffer hands out a batch of prompt groups, they are generated, put back, and taken within
  the staleness bound; a group aborted from outside goes back to the buffer and is generated again.

Then --buffer-filter-path may drop groups. Asynchronous loop: ``start_producer`` starts the producer of
rollout/streaming.py and ``take`` waits for each step's batch from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sluice.buffer.handle import BlockingBuffer, BufferHandle
from sluice.checkpoint.rollout_data import load_rollout_data, rollout_data_path
from sluice.config import ConfigError, DebugConfig, RolloutConfig
from sluice.observability.progress import ProgressReporter
from sluice.rollout.buffer_filter import BufferFilter
from sluice.rollout.dynamic_sampling import GroupFilter, SamplingOutcome, sample_filtered_groups
from sluice.rollout.finish import BatchFinisher, FinishedBatch, MemoryGuard
from sluice.rollout.manager import RolloutManager
from sluice.rollout.plugin_failures import function_name
from sluice.rollout.sampling import sampling_params
from sluice.rollout.seeds import TRAIN_STREAM
from sluice.rollout.step import RolloutFn, RolloutRequest
from sluice.rollout.streaming import StreamingRollout
from sluice.types import SampleGroup, Status


@dataclass
class RolloutBatches:
    manager: RolloutManager
    buffer: BlockingBuffer  # the sync loop's calls, and the prompt source of rollout functions
    buffer_handle: BufferHandle  # the async producer's calls
    rollout: RolloutConfig
    debug: DebugConfig
    finisher: BatchFinisher
    memory: MemoryGuard
    progress: ProgressReporter
    loop: asyncio.AbstractEventLoop  # the run's one event loop (engine clients stay bound to it)
    log: Callable[[str], None]
    rollout_fn: RolloutFn | None = None  # --rollout-function-path
    group_filter: GroupFilter | None = None  # --dynamic-sampling-filter-path
    buffer_filter: BufferFilter | None = None  # --buffer-filter-path
    engine_watch: Callable[[], Awaitable[None]] | None = None  # run beside the async producer (Ray: health probe)

    # ---- synchronous loop -------------------------------------------------------------------------------
    def generate(self, rollout_id: int) -> FinishedBatch:
        """The batch of step ``rollout_id``: generated and scored (or replayed), then finished."""
        if self.debug.load_debug_rollout_data:
            return self.finisher.finish(self._replay(rollout_id), rollout_id, generated=False)
        with self.memory.explain("rollout"):
            groups, step_metrics = self._generate(rollout_id)
        return self.finisher.finish(groups, rollout_id, step_metrics=step_metrics)

    def _generate(self, rollout_id: int) -> tuple[list[SampleGroup], dict[str, float]]:
        rollout = self.rollout
        samples_per_rollout = (rollout.rollout_batch_size or 0) * rollout.n_samples_per_prompt
        first_index = rollout_id * samples_per_rollout  # Sample.index: unique in the run
        total = None if rollout.dynamic_sampling else samples_per_rollout
        step_metrics: dict[str, float] = {}  # from dynamic sampling, a rollout function and the buffer filter
        with self.progress.stage("rollout", total=total) as bar:
            manager = _counting(self.manager, bar)
            request = RolloutRequest(rollout_id, rollout.rollout_batch_size, rollout.n_samples_per_prompt,
                                     sampling_params(rollout), first_index, self.buffer, manager)
            if self.rollout_fn is not None:
                # a rollout function may generate more samples than a step holds (from first_index on): seeds of
                # their own per step keep them apart from the next step's
                request.manager = manager.seeded_as(f"{TRAIN_STREAM}/rollout-function/{rollout_id}")
                output = self.loop.run_until_complete(self.rollout_fn(request))
                groups, step_metrics = output.groups, dict(output.metrics)
            elif rollout.dynamic_sampling:
                outcome = self.loop.run_until_complete(sample_filtered_groups(
                    manager, self.buffer, rollout.rollout_batch_size,
                    rollout.over_sampling_batch_size or rollout.rollout_batch_size, rollout.n_samples_per_prompt,
                    sampling_params(rollout), self.group_filter, first_index=first_index))
                self._report_short_batch(outcome)
                groups, step_metrics = outcome.groups, outcome.metrics()
            else:
                groups = self._generate_through_buffer(manager)
        if self.buffer_filter is not None:
            chosen = self.buffer_filter(groups, request.num_groups, request.rollout_id)
            step_metrics["rollout/buffer_dropped_groups"] = float(len(groups) - len(chosen))
            groups = chosen
        return groups, step_metrics

    def _generate_through_buffer(self, manager: RolloutManager) -> list[SampleGroup]:
        """One step's groups: handed out by the buffer, generated, put back, and taken within the staleness bound.
        A group aborted from outside goes back to the buffer and is generated again, so no prompt is lost."""
        num_groups = self.rollout.rollout_batch_size

        async def generate_all() -> None:
            gates = manager.new_gates()
            pending = self.buffer.get_prompt_groups(num_groups)
            while pending:
                done = await asyncio.gather(*(manager.continue_group(g, sampling_params(self.rollout), gates)
                                              for g in pending))
                aborted = [g for g in done if any(s.status == Status.ABORTED for s in g.samples)]
                self.buffer.put_finished([g for g in done if all(g is not a for a in aborted)])
                if aborted:
                    self.buffer.requeue(aborted)
                pending = self.buffer.get_prompt_groups(len(aborted)) if aborted else []

        self.loop.run_until_complete(generate_all())
        groups = self.buffer.take_train_groups(num_groups, trainer_version=self.buffer.weight_version)
        groups.sort(key=lambda g: g.group_id)
        return groups

    def _replay(self, rollout_id: int) -> list[SampleGroup]:
        """The groups --save-debug-rollout-data wrote for ``rollout_id`` (the prompt cursor does not move)."""
        template = self.debug.load_debug_rollout_data
        try:
            return load_rollout_data(rollout_data_path(template, rollout_id),
                                     rollout_id if "{rollout_id}" in template else None)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--load-debug-rollout-data: {error}") from error

    def _report_short_batch(self, outcome: SamplingOutcome) -> None:
        target = self.rollout.rollout_batch_size
        if outcome.num_passed_groups < target:
            self.log(f"dynamic sampling: {outcome.num_passed_groups} of {target} groups passed the filter "
                     f"in {outcome.num_generation_rounds} rounds; training on {len(outcome.groups)}")

    # ---- asynchronous loop (called on its event loop) -----------------------------------------------------
    def start_producer(self, num_steps: int) -> StreamingRollout:
        """The producer that keeps the engines generating; it stops once ``num_steps`` batches are covered."""
        rollout = self.rollout
        producer = StreamingRollout(
            self.manager, self.buffer_handle, sampling_params(rollout),
            groups_to_train=num_steps * rollout.rollout_batch_size, partial_rollout=rollout.partial_rollout,
            mask_offpolicy=rollout.mask_offpolicy_in_partial_rollout, group_filter=self.group_filter,
            watch=self.engine_watch)
        producer.start()
        return producer

    async def take(self, producer: StreamingRollout, rollout_id: int) -> FinishedBatch:
        """The batch of step ``rollout_id``: finished groups at most --max-staleness versions behind it."""
        groups = await producer.take(self.rollout.rollout_batch_size, trainer_version=rollout_id)
        return self.finisher.finish(groups, rollout_id)


def _counting(manager: RolloutManager, bar) -> RolloutManager:
    """``manager`` with a generate function that advances ``bar`` as each sample finishes."""
    inner = manager.generate_fn

    async def generate_and_count(sample, sampling_params, ctx):
        try:
            return await inner(sample, sampling_params, ctx)
        finally:
            bar.advance()

    generate_and_count.plugin_path = function_name(inner)  # failure reports name the function it wraps
    return dataclasses.replace(manager, generate_fn=generate_and_count)
