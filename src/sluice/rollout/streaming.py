"""The asynchronous loop's producer: keeps the engines generating across training steps.

Producers, consumers and what blocks them::

    DataBuffer ──get_prompt_groups(room)──► StreamingRollout._produce ──one task per group──► RolloutManager
        ▲   ▲                                  │ waits on _wake when room == 0               (generate, score)
        │   │                                  ▼                                                  │
        │   └──── put_finished / requeue (aborted) / drop (filtered) ◄────────────────────────────┘
        │
        └──── take_train_groups ◄── take(num_groups, trainer_version) ◄── the trainer (loops.train_async)
                                     waits on _settled until the whole batch is finished

``StreamingRollout`` runs on the loop's event loop. It asks the Data Buffer for as many prompt groups as the
buffer's memory bound allows, generates each group as its own task (through the rollout manager, sharing one
set of concurrency bounds), and hands each back as it finishes: finished groups to ``put_finished``, groups with
an aborted sample to ``requeue`` (their tokens kept: --partial-rollout), groups a dynamic filter rejects to
``drop``. The trainer side takes batches with ``take``; the buffer bounds their staleness.

Backpressure: the buffer holds at most ``max_held_groups`` groups in flight or finished, so the producer stops
handing out prompts while the trainer has not taken the finished ones; it also stops once the groups still
needed for the run's remaining steps are covered. The trainer, in turn, waits while fewer than a batch of
groups within the staleness bound are finished.

At a weight update the producer either keeps going (requests in flight continue on the new weights, their
tokens tagged with both versions), or, with ``partial_rollout``, pauses, aborts what is in flight and waits for
those groups to be requeued, so the update lands while the engines are empty (``around_update``).

The buffer is reached through a ``BufferHandle`` (buffer/handle.py): a DataBuffer of this process or a Ray
actor. Either way its methods run one at a time, so the producer and the loop never see a half-made change.
``watch``, where given, runs beside the producer for its whole life (the Ray placement's engine health probe).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sluice.buffer.handle import BufferHandle
from sluice.rollout.manager import RolloutManager, cancel_tasks
from sluice.types import Sample, SampleGroup, SamplingParams, Status

log = logging.getLogger("sluice.rollout")
GroupFilter = Callable[[list[Sample]], bool]


class StreamingRollout:
    def __init__(self, manager: RolloutManager, buffer: BufferHandle, sampling_params: SamplingParams, *,
                 groups_to_train: int, partial_rollout: bool = False, mask_offpolicy: bool = False,
                 group_filter: GroupFilter | None = None, watch: Callable[[], Awaitable[None]] | None = None) -> None:
        self.manager, self.buffer, self.sampling_params = manager, buffer, sampling_params
        self.watch = watch
        self.partial_rollout, self.mask_offpolicy, self.group_filter = partial_rollout, mask_offpolicy, group_filter
        self._remaining = groups_to_train  # groups the loop will still take: nothing is generated past them
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()  # slots freed, a group settled, resumed or stopping: look again
        self._settled = asyncio.Event()  # a group went back to the buffer
        self._running = asyncio.Event()  # cleared while paused (a weight update, an engine recovery)
        self._running.set()
        self._pauses = 0
        self._stopping = False
        self._error: BaseException | None = None
        self._main: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self.gates = manager.new_gates()
        self.counts = {"finished": 0, "requeued": 0, "filtered": 0}  # this producer's, since the run (re)started
        self._idle_since: float | None = time.perf_counter()
        self._idle_seconds = 0.0  # time with no group generating, since the last step_metrics
        self._stale_requeued = 0  # the buffer's count: finished groups too stale to train, generated again

    # ---- control ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._main = asyncio.ensure_future(self._produce())
        if self.watch is not None:
            self._watcher = asyncio.ensure_future(self.watch())

    async def take(self, num_groups: int, trainer_version: int) -> list[SampleGroup]:
        """The next ``num_groups`` finished groups within the staleness bound, waiting for them as needed."""
        taken: list[SampleGroup] = []
        while True:
            self._raise_if_failed()
            self._settled.clear()
            # Take only once the whole batch is there: groups taken early would free their slots in the buffer,
            # and the producer would fill them with groups for a later step, generated by weights that are stale
            # by the time that step comes (they would be generated twice).
            if (await self.buffer.counts())["finished"] >= num_groups - len(taken):
                got = await self.buffer.take_train_groups(num_groups - len(taken), trainer_version)
                self._stale_requeued = (await self.buffer.counts())["stale_requeued"]
                taken += got
                self._remaining -= len(got)  # at once: taken groups no longer count as "finished" in the buffer
                self._wake.set()  # slots freed (and stale groups requeued, to be generated again)
                if len(taken) == num_groups:
                    return taken
                continue
            await self._settled.wait()

    async def around_update(self, update: Awaitable) -> Any:
        """Run the weight update ``update``; with partial rollout, on engines emptied of this producer's work."""
        if not self.partial_rollout:
            return await update
        self._pause()
        try:
            while self._tasks:  # abort again until every group settled: a sample may reach the engine late
                await self.manager.ctx.client.abort(None)
                await asyncio.wait(self._tasks, timeout=0.05)
            self._raise_if_failed()
            return await update
        finally:
            self._unpause()

    def _pause(self) -> None:
        self._pauses += 1
        self._running.clear()

    def _unpause(self) -> None:
        self._pauses -= 1
        if self._pauses == 0:
            self._running.set()
        self._wake.set()

    async def stop(self) -> None:
        """Stop generating; groups still in flight stay in flight in the buffer (a checkpoint saves them)."""
        if self._watcher is not None:
            await cancel_tasks([self._watcher])
            self._watcher = None
        self._stopping = True
        self._wake.set()
        self._pauses = 0
        self._running.set()
        if self._main is not None:
            await cancel_tasks([self._main])
        await cancel_tasks(list(self._tasks))

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        """Idle fraction of the rollout pool since the previous call (no group generating), and counts."""
        now = time.perf_counter()
        idle = self._idle_seconds + (now - self._idle_since if self._idle_since is not None else 0.0)
        self._idle_seconds = 0.0
        if self._idle_since is not None:
            self._idle_since = now
        return {
            "perf/rollout_idle_frac": min(idle / step_seconds, 1.0) if step_seconds > 0 else 0.0,
            "rollout/stale_requeued_groups_total": float(self._stale_requeued),
            "rollout/requeued_groups_total": float(self.counts["requeued"]),
            "rollout/filtered_groups_total": float(self.counts["filtered"]),
        }

    # ---- producing --------------------------------------------------------------------------------------
    async def _produce(self) -> None:
        try:
            while not self._stopping:
                await self._running.wait()
                self._wake.clear()
                room = await self._room()
                if room > 0 and not self._stopping:
                    groups = await self.buffer.get_prompt_groups(room)
                    if self._running.is_set():
                        for group in groups:
                            self._launch(group)
                    else:  # paused while the buffer answered (a Ray actor call yields): hand them back
                        await self.buffer.requeue(groups)
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - surfaced to the loop by take()
            self._fail(error)

    async def _room(self) -> int:
        """How many groups to hand out now: bounded by the buffer's free slots and by what is still needed."""
        counts = await self.buffer.counts()
        return min(counts["free"], self._remaining - counts["finished"] - len(self._tasks))

    def _launch(self, group: SampleGroup) -> None:
        task = asyncio.ensure_future(self._generate(group))
        self._tasks.add(task)
        if self._idle_since is not None:
            self._idle_seconds += time.perf_counter() - self._idle_since
            self._idle_since = None
        task.add_done_callback(self._finished_task)

    def _finished_task(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        # Look for room again now: a group counts as finished in the buffer before its task is gone from
        # _tasks, so a look taken in between saw one slot too few, and nothing else would wake the producer.
        self._wake.set()
        if not self._tasks and self._idle_since is None:
            self._idle_since = time.perf_counter()
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    async def _generate(self, group: SampleGroup) -> None:
        group = await self.manager.continue_group(group, self.sampling_params, self.gates)
        if any(s.status == Status.ABORTED for s in group.samples):
            if self.mask_offpolicy:  # tokens of the weights before the update stay as context, not trained
                for sample in group.samples:
                    if sample.status == Status.ABORTED:
                        sample.loss_mask = [0] * len(sample.loss_mask)
            await self.buffer.requeue([group])
            self.counts["requeued"] += 1
        elif self.group_filter is not None and not self.group_filter(group.samples):
            await self.buffer.drop([group])
            self.counts["filtered"] += 1
        else:
            await self.buffer.put_finished([group])
            self.counts["finished"] += 1
        self._settled.set()
        self._wake.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            log.error("the rollout producer stopped: %s: %s", type(error).__name__, error)
        self._settled.set()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"rollout failed: {type(self._error).__name__}: {self._error}") from self._error
