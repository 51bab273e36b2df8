"""``MultiEngineClient``: several engines behind one ``EngineClient``.

Routing: requests that share a group key stay on one engine, so the n samples of a GRPO group (or the turns of
a conversation) reuse that engine's cached prompt prefix. A key seen for the first time goes to the engine with
the fewest outstanding requests (ties: the one that got the fewest so far). Without ``group_key`` the key is a
hash of the whole prompt: identical prompts (a group's samples) stick together, while prompts that merely
share a long system prompt still spread out. The key -> engine map is a bounded LRU.

Control calls (weights, pause, resume, abort-all) go to every engine; the weight version is the oldest of them.
All bookkeeping happens on the event loop between awaits, so it needs no lock.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from sluice.engine.clients.protocol import EngineClient, GenerateRequest, GenerateResult, NamedTensors


class MultiEngineClient:
    def __init__(self, clients: list[EngineClient], max_remembered_groups: int = 65536):
        if not clients:
            raise ValueError("MultiEngineClient needs at least one engine client")
        self.clients = list(clients)
        self.outstanding = [0] * len(clients)  # requests sent and not yet answered, per engine
        self.num_routed = [0] * len(clients)  # requests ever sent, per engine
        self.max_remembered_groups = max_remembered_groups
        self._engine_of_group: OrderedDict[str, int] = OrderedDict()
        self._engine_of_rid: dict[str, int] = {}

    def route(self, request: GenerateRequest) -> int:
        """The index of the engine this request goes to (and remember it for its group)."""
        key = request.group_key if request.group_key is not None else prompt_key(request.input_ids)
        index = self._engine_of_group.get(key)
        if index is None:
            index = min(range(len(self.clients)), key=lambda i: (self.outstanding[i], self.num_routed[i]))
        self._engine_of_group[key] = index
        self._engine_of_group.move_to_end(key)
        while len(self._engine_of_group) > self.max_remembered_groups:
            self._engine_of_group.popitem(last=False)
        return index

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        index = self.route(request)
        self.outstanding[index] += 1
        self.num_routed[index] += 1
        self._engine_of_rid[request.rid] = index
        try:
            return await self.clients[index].generate(request)
        finally:
            self.outstanding[index] -= 1
            self._engine_of_rid.pop(request.rid, None)

    async def update_weights(self, weights: NamedTensors | str, version: int) -> None:
        await asyncio.gather(*(client.update_weights(weights, version) for client in self.clients))

    async def abort(self, rid: str | None = None) -> None:
        """Abort on the engine serving ``rid`` (every engine if unknown), or everything with None."""
        index = self._engine_of_rid.get(rid) if rid is not None else None
        targets = [self.clients[index]] if index is not None else self.clients
        await asyncio.gather(*(client.abort(rid) for client in targets))

    async def pause(self) -> None:
        await asyncio.gather(*(client.pause() for client in self.clients))

    async def resume(self) -> None:
        await asyncio.gather(*(client.resume() for client in self.clients))

    async def weight_version(self) -> int:
        """The oldest engine's version: the newest policy every engine is known to serve."""
        return min(await asyncio.gather(*(client.weight_version() for client in self.clients)))

    async def aclose(self) -> None:
        """Close the clients' connection pools (HTTP clients have one; in-process clients have none)."""
        await asyncio.gather(*(client.aclose() for client in self.clients if hasattr(client, "aclose")))


def prompt_key(input_ids: list[int]) -> str:
    return f"prompt:{len(input_ids)}:{hash(tuple(input_ids))}"
