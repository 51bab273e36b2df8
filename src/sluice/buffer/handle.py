"""The Data Buffer as its callers reach it, whether it lives in this process or in a Ray actor.

- ``BlockingBuffer``: plain calls that return when the buffer has answered; the sync loop, checkpoints and
  rollout plug-ins (a rollout function draws prompts with ``next_batch``) use it. A ``DataBuffer`` is one;
  ``orchestration.ray_pools.RayBuffer`` forwards each method to the buffer actor.
- ``BufferHandle``: the same operations awaited, for the async producer on the event loop.
  ``LocalBufferHandle`` wraps a DataBuffer of this process; ``orchestration.ray_pools.RayBufferHandle`` awaits
  the actor.

Either way the buffer runs one call at a time, so no caller ever sees a half-made change.
"""

from __future__ import annotations

from typing import Any, Protocol

from sluice.buffer.data_buffer import DataBuffer
from sluice.types import Sample, SampleGroup


class BlockingBuffer(Protocol):
    @property
    def weight_version(self) -> int: ...

    def counts(self) -> dict[str, int]: ...

    def get_prompt_groups(self, num_groups: int) -> list[SampleGroup]: ...

    def next_batch(self, n: int) -> list[Sample]: ...

    def put_finished(self, groups: list[SampleGroup]) -> None: ...

    def requeue(self, groups: list[SampleGroup]) -> None: ...

    def drop(self, groups: list[SampleGroup]) -> None: ...

    def set_weight_version(self, version: int) -> None: ...

    def take_train_groups(self, num_groups: int, trainer_version: int) -> list[SampleGroup]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BufferHandle(Protocol):
    async def counts(self) -> dict[str, int]: ...

    async def get_prompt_groups(self, num_groups: int) -> list[SampleGroup]: ...

    async def put_finished(self, groups: list[SampleGroup]) -> None: ...

    async def requeue(self, groups: list[SampleGroup]) -> None: ...

    async def drop(self, groups: list[SampleGroup]) -> None: ...

    async def set_weight_version(self, version: int) -> None: ...

    async def take_train_groups(self, num_groups: int, trainer_version: int) -> list[SampleGroup]: ...


class LocalBufferHandle:
    """A DataBuffer of this process, called from the event loop's thread only (so no lock is needed)."""

    def __init__(self, buffer: DataBuffer) -> None:
        self.buffer = buffer

    async def counts(self) -> dict[str, int]:
        return self.buffer.counts()

    async def get_prompt_groups(self, num_groups: int) -> list[SampleGroup]:
        return self.buffer.get_prompt_groups(num_groups)

    async def put_finished(self, groups: list[SampleGroup]) -> None:
        self.buffer.put_finished(groups)

    async def requeue(self, groups: list[SampleGroup]) -> None:
        self.buffer.requeue(groups)

    async def drop(self, groups: list[SampleGroup]) -> None:
        self.buffer.drop(groups)

    async def set_weight_version(self, version: int) -> None:
        self.buffer.set_weight_version(version)

    async def take_train_groups(self, num_groups: int, trainer_version: int) -> list[SampleGroup]:
        return self.buffer.take_train_groups(num_groups, trainer_version)
