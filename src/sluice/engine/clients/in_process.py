"""The client of an engine in this process: ``EngineClient`` calls turned into ``LocalEngine`` calls."""

from __future__ import annotations

import asyncio

from sluice.engine.clients.protocol import GenerateRequest, GenerateResult, NamedTensors
from sluice.engine.local_engine import LocalEngine


class InProcessClient:
    """Async front of a LocalEngine living in this process (its worker thread does the compute)."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def on_done(result):  # called on the engine thread
            try:
                loop.call_soon_threadsafe(settle_future, future, result)
            except RuntimeError:  # the caller's event loop is gone (it stopped waiting): nobody to tell
                pass

        self.engine.submit(request, on_done)
        try:
            return await future
        except asyncio.CancelledError:
            self.engine.abort(request.rid)  # free the engine from work nobody will read
            raise

    async def update_weights(self, weights: NamedTensors | str, version: int) -> None:
        await asyncio.to_thread(self.engine.update_weights, weights, version)

    async def abort(self, rid: str | None = None) -> None:
        self.engine.abort(rid)

    async def pause(self) -> None:
        self.engine.pause()

    async def resume(self) -> None:
        self.engine.resume()

    async def weight_version(self) -> int:
        return self.engine.weight_version


def settle_future(future: asyncio.Future, result) -> None:
    """Resolve ``future`` with a result or an exception, unless its waiter already gave up."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
