"""The asyncio face of a LocalEngine for the HTTP server: one awaitable result, or a stream of token deltas.

The engine calls back on its worker thread; these classes hop each callback onto the server's event loop with
``call_soon_threadsafe`` and never touch asyncio objects from the worker thread. A request whose caller stops
waiting (client gone, task cancelled) is aborted, so the engine does not decode for nobody.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from sluice.engine.clients.in_process import settle_future as _settle
from sluice.engine.clients.protocol import GenerateRequest, GenerateResult, TopLogprobs


@dataclass
class TokenDelta:
    """Tokens generated since the previous delta of the same request."""

    output_ids: list[int]
    output_logprobs: list[float]
    output_top_logprobs: list[TopLogprobs]  # empty unless the request set top_logprobs_num
    output_token_ids_logprobs: list[list[float]]  # empty unless the request set token_ids_logprob


class AsyncEngine:
    def __init__(self, engine):
        self.engine = engine  # a LocalEngine (or anything with its submit/abort)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Submit and wait; raises ValueError at once for a request the engine refuses."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self.engine.submit(request, lambda outcome: _post(loop, _settle, future, outcome))
        try:
            return await future
        except asyncio.CancelledError:
            self.engine.abort(request.rid)
            raise

    def open_stream(self, request: GenerateRequest) -> "TokenStream":
        """Submit now (so a refused request fails before any response is sent) and stream its progress."""
        return TokenStream(self.engine, request)


class TokenStream:
    """Async iterator of ``TokenDelta`` items, then the final ``GenerateResult``; closing it early aborts."""

    def __init__(self, engine, request: GenerateRequest):
        self.engine = engine
        self.request = request
        self.finished = False
        # the prompt logprobs (GenerateResult's form), set before the first TokenDelta is yielded
        self.input_logprobs: list[float | None] = []
        self.input_top_logprobs: list[TopLogprobs | None] = []
        self.input_token_ids_logprobs: list[list[float] | None] = []
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        put = self._queue.put_nowait
        engine.submit(
            request,
            on_done=lambda outcome: _post(loop, put, outcome),
            on_update=lambda ids, logprobs, top, named: _post(
                loop, put, TokenDelta(list(ids), list(logprobs), list(top), list(named))),
            on_input_logprobs=lambda logprobs, tops, named: _post(loop, self._keep_input_logprobs, logprobs, tops,
                                                                  named),
        )

    def _keep_input_logprobs(self, logprobs: list, tops: list, named: list) -> None:
        # Posted before the first delta's put, so it runs first on the loop: the delta sees these values.
        self.input_logprobs, self.input_top_logprobs = list(logprobs), list(tops)
        self.input_token_ids_logprobs = list(named)

    def __aiter__(self) -> AsyncIterator[TokenDelta | GenerateResult]:
        return self._items()

    async def _items(self) -> AsyncIterator[TokenDelta | GenerateResult]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if isinstance(item, GenerateResult):
                    self.finished = True
                    yield item
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request.rid)


async def merge_streams(streams: list[TokenStream]) -> AsyncIterator[tuple[int, TokenDelta | GenerateResult]]:
    """Items of several streams as they come, tagged with the stream's index (for n > 1 and prompt lists)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: TokenStream) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as error:  # noqa: BLE001 - handed to the consumer below
            await queue.put((index, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerateResult):
                remaining -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


def _post(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run ``callback(*args)`` on ``loop`` from the engine thread; a closed loop means nobody is listening."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass

