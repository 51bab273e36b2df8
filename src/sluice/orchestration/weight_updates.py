"""Weight updates: the trainer's weights to the engines after training steps, the buffer's weight version
following them; and the replacement of lost engines, which get the last pushed weights.

The sync loop updates between steps (``sync``: the buffer's version first, then the push); the async loop while
the engines keep generating (``push``: the push, then the buffer hands out groups under the new version). A
push and an engine recovery never interleave: both hold ``_recovery_lock``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sluice.buffer.handle import BlockingBuffer, BufferHandle
from sluice.orchestration.pools import EnginePool, TrainerPool

ENGINE_WATCH_INTERVAL_S = 10.0  # how often the async loop probes the engines


class WeightUpdates:
    def __init__(self, trainer: TrainerPool | None, engines: EnginePool | None, buffer: BlockingBuffer,
                 buffer_handle: BufferHandle, loop: asyncio.AbstractEventLoop, log: Callable[[str], None]) -> None:
        self.trainer, self.engines, self.buffer, self.buffer_handle = trainer, engines, buffer, buffer_handle
        self.loop, self.log = loop, log
        self.pushed_version = 0  # what a restarted engine is labelled with: never older than the others have
        self.num_engine_restarts = 0
        self._recovery: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def sync(self, version: int, push: bool = True) -> dict[str, float]:
        """The sync loop's update: the buffer's version, then, with ``push``, the trainer's weights to the engines
        as ``version`` (no push without engines: --debug-train-only, SFT without eval sets). Returns sync metrics
        (time, bytes) where reported."""
        self.buffer.set_weight_version(version)
        return self.loop.run_until_complete(self._send(version)) if push and self.engines is not None else {}

    async def push(self, version: int) -> dict[str, float]:
        """The async loop's update: the engines take the weights between their steps; the buffer then hands out
        groups under the new version."""
        metrics = await self._send(version) if self.engines is not None else {}
        await self.buffer_handle.set_weight_version(version)
        return metrics

    async def _send(self, version: int) -> dict[str, float]:
        async with self._recovery_lock():  # never interleaved with a recovery's own push
            metrics = await self.trainer.push_weights(version)
        self.pushed_version = version
        return metrics

    async def recover_engines(self) -> None:
        """Restart the engines that died or hang, push them the current weights, and route to them again.
        Called when a request lost its engine, and every ENGINE_WATCH_INTERVAL_S by ``watch_engines``."""
        async with self._recovery_lock():
            lost = await asyncio.to_thread(self.engines.lost)
            if not lost:
                return
            self.log(f"engines lost: {', '.join(self.engines.urls[i] for i in lost)}; restarting")
            await self.engines.restart(lost)
            if self.trainer is not None:  # labelled with the last pushed version: never older than the engines have
                await asyncio.to_thread(self.trainer.connect_engines, self.engines)
                await self.trainer.push_weights(self.pushed_version)
            self.num_engine_restarts += len(lost)
            self.log(f"engines restarted and re-synced: {', '.join(self.engines.urls[i] for i in lost)}")

    async def watch_engines(self) -> None:
        """Probe the engines now and then, so a hung engine (no error, no progress) is found and replaced."""
        while True:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
            try:
                await self.recover_engines()
            except Exception as error:  # noqa: BLE001 - logged; the next probe tries again
                self.log(f"engine watch: {type(error).__name__}: {error}")

    def _recovery_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()  # a lock belongs to one event loop: a test may call from another
        if self._recovery is None or self._recovery[0] is not loop:
            self._recovery = (loop, asyncio.Lock())
        return self._recovery[1]
