"""The Ray placement's pools: engine actors, trainer actors and the buffer actor behind the typed interfaces of
orchestration/pools.py and buffer/handle.py. The actor classes are in ray_actors.py; where each actor is placed
(placement groups, GPU shares) is decided by ray_placement.py, which hands the pools a function that starts one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from sluice.engine.clients.http import HttpEngineClient
from sluice.engine.clients.router import MultiEngineClient
from sluice.net.transport import bearer_headers
from sluice.trainer.held_out import HeldOutLoss
from sluice.types import Sample, SampleGroup

ENGINE_START_TIMEOUT_S = 600.0
ENGINE_PROBE_TIMEOUT_S = 60.0  # a live engine answers a one-token generation well within this
ACTOR_STOP_TIMEOUT_S = 30.0


def stop_actors(actors: list[Any]) -> None:
    """Ask each actor to stop (servers, process groups), then kill it: stuck or dead, it is gone either way."""
    import ray

    for actor in actors:
        try:
            ray.get(actor.shutdown.remote(), timeout=ACTOR_STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a dead actor has nothing left to stop
            pass
    for actor in actors:
        ray.kill(actor)


class RayEnginePool:
    """Engine actors, each a LocalEngine behind its HTTP server; the rollout reaches them through a router."""

    can_restart = True

    def __init__(self, start_actor: Callable[[int], Any], num_engines: int) -> None:
        """Starts the actors; ``wait_ready`` then waits for their servers. ``start_actor(index)``: a new engine
        actor in bundle ``index`` of the rollout pool."""
        self.start_actor = start_actor
        self.actors = [start_actor(index) for index in range(num_engines)]
        self.urls: list[str] = []
        self.context_len = 0
        self.client: MultiEngineClient | None = None
        self.api_key: str | None = None  # the run's key to its engine servers (engine_access.py)

    def wait_ready(self) -> None:
        import ray

        self.urls = ray.get([actor.url.remote() for actor in self.actors], timeout=ENGINE_START_TIMEOUT_S)
        self.context_len = ray.get(self.actors[0].context_len.remote())
        self.api_key = ray.get(self.actors[0].client_key.remote())
        self.client = MultiEngineClient([HttpEngineClient(url, api_key=self.api_key) for url in self.urls])

    @property
    def _auth(self) -> dict[str, str]:
        return bearer_headers(self.api_key)

    def lost(self, timeout_s: float | None = None) -> list[int]:
        """Engines whose actor died, or whose engine does not generate one token within ``timeout_s`` (default
        ENGINE_PROBE_TIMEOUT_S)."""
        import httpx
        import ray

        timeout_s = timeout_s or ENGINE_PROBE_TIMEOUT_S
        lost = []
        for index, (engine, url) in enumerate(zip(self.actors, self.urls)):
            try:
                ray.get(engine.weight_version.remote(), timeout=timeout_s)
                httpx.get(url + "/health_generate", timeout=timeout_s, headers=self._auth).raise_for_status()
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, httpx.HTTPError):
                lost.append(index)
        return lost

    async def restart(self, indices: list[int]) -> None:
        """New engine actors in the lost ones' bundles (the old ones are killed first, stuck or dead), and new
        clients to them in the router."""
        await asyncio.to_thread(self._restart_actors, indices)
        for index in indices:
            await self.client.clients[index].aclose()
            self.client.clients[index] = HttpEngineClient(self.urls[index], api_key=self.api_key)

    def _restart_actors(self, indices: list[int]) -> None:
        import ray

        for index in indices:
            ray.kill(self.actors[index])
            self.actors[index] = self.start_actor(index)
        for index in indices:
            self.urls[index] = ray.get(self.actors[index].url.remote(), timeout=ENGINE_START_TIMEOUT_S)

    def offload(self) -> None:
        import ray

        ray.get([actor.release_memory.remote() for actor in self.actors])

    def onload(self) -> None:
        import ray

        ray.get([actor.resume_memory.remote() for actor in self.actors])

    def shutdown(self) -> None:
        stop_actors(self.actors)
        self.actors = []


class RayTrainerPool:
    """The trainer ranks as one trainer: every call goes to all ranks (data-parallel), results come from rank 0."""

    def __init__(self, actors: list[Any], pad_token_id: int) -> None:
        self.actors, self.pad_token_id = actors, pad_token_id
        # every rank must receive the calls in one order (collectives): submit one fan-out at a time
        self._submit = threading.Lock()

    def _fan_out(self, call: Callable[[Any], Any]) -> list[Any]:
        """``call(actor)`` (a ``.remote`` call) on every rank; their object refs, rank 0 first."""
        with self._submit:
            return [call(actor) for actor in self.actors]

    def _all(self, call: Callable[[Any], Any]) -> list[Any]:
        import ray

        return ray.get(self._fan_out(call))

    def train(self, groups: list[SampleGroup], rewards: list[list[float]], train_actor: bool) -> dict[str, float]:
        import ray

        groups_ref, rewards_ref = ray.put(groups), ray.put(rewards)  # serialised once, not per rank
        results = self._all(lambda a: a.train.remote(groups_ref, rewards_ref, train_actor, self.pad_token_id))
        merged = dict(results[0])  # the same on every rank, but each rank's own peak memory
        for result in results[1:]:
            merged.update({key: value for key, value in result.items() if key.startswith("perf/peak_gpu")})
        return merged

    def held_out_loss(self, samples: list[Sample]) -> HeldOutLoss:
        import ray

        samples_ref = ray.put(samples)  # every rank runs its share of the forward passes (a collective)
        return self._all(lambda a: a.held_out_loss.remote(samples_ref, self.pad_token_id))[0]

    def update_reference(self) -> None:
        self._all(lambda a: a.update_reference.remote())

    def offload(self) -> None:
        self._all(lambda a: a.offload.remote())

    def onload(self) -> None:
        self._all(lambda a: a.onload.remote())

    def connect_engines(self, engines: RayEnginePool) -> None:
        import ray

        ray.get(self.actors[0].connect_engines.remote(engines.urls))

    async def push_weights(self, version: int) -> dict[str, float]:
        results = await asyncio.gather(*self._fan_out(lambda a: a.push_weights.remote(version)))
        return results[0]

    def state_dict(self, with_optimizer: bool = True) -> dict:
        return self._all(lambda a: a.state_dict.remote(with_optimizer))[0]

    def load_state_dict(self, state: dict) -> None:
        import ray

        state_ref = ray.put(state)
        self._all(lambda a: a.load_state_dict.remote(state_ref))

    def weight_checksums(self) -> dict[str, int]:
        return self._all(lambda a: a.weight_checksums.remote())[0]

    @property
    def model(self):
        """A CPU copy of the actor model, for HF exports written by this process."""
        return self._all(lambda a: a.model_on_cpu.remote())[0]

    def shutdown(self) -> None:
        stop_actors(self.actors)
        self.actors = []


class RayBuffer:
    """The buffer actor called as a DataBuffer: each call blocks until the actor answered (the sync loop,
    checkpoints, and rollout plug-ins given the buffer as their prompt source)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    @staticmethod
    def _get(ref: Any) -> Any:
        import ray

        return ray.get(ref)

    @property
    def weight_version(self) -> int:
        return self._get(self.actor.get_weight_version.remote())

    def counts(self) -> dict[str, int]:
        return self._get(self.actor.counts.remote())

    def get_prompt_groups(self, num_groups: int) -> list[SampleGroup]:
        return self._get(self.actor.get_prompt_groups.remote(num_groups))

    def next_batch(self, n: int) -> list[Sample]:
        return self._get(self.actor.next_batch.remote(n))

    def put_finished(self, groups: list[SampleGroup]) -> None:
        self._get(self.actor.put_finished.remote(groups))

    def requeue(self, groups: list[SampleGroup]) -> None:
        self._get(self.actor.requeue.remote(groups))

    def drop(self, groups: list[SampleGroup]) -> None:
        self._get(self.actor.drop.remote(groups))

    def set_weight_version(self, version: int) -> None:
        self._get(self.actor.set_weight_version.remote(version))

    def take_train_groups(self, num_groups: int, trainer_version: int) -> list[SampleGroup]:
        return self._get(self.actor.take_train_groups.remote(num_groups, trainer_version))

    def state_dict(self) -> dict[str, Any]:
        return self._get(self.actor.state_dict.remote())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._get(self.actor.load_state_dict.remote(state))


class RayBufferHandle:
    """The buffer actor awaited from the event loop (the async producer): other work runs while it answers."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def counts(self) -> dict[str, int]:
        return await self.actor.counts.remote()

    async def get_prompt_groups(self, num_groups: int) -> list[SampleGroup]:
        return await self.actor.get_prompt_groups.remote(num_groups)

    async def put_finished(self, groups: list[SampleGroup]) -> None:
        await self.actor.put_finished.remote(groups)

    async def requeue(self, groups: list[SampleGroup]) -> None:
        await self.actor.requeue.remote(groups)

    async def drop(self, groups: list[SampleGroup]) -> None:
        await self.actor.drop.remote(groups)

    async def set_weight_version(self, version: int) -> None:
        await self.actor.set_weight_version.remote(version)

    async def take_train_groups(self, num_groups: int, trainer_version: int) -> list[SampleGroup]:
        return await self.actor.take_train_groups.remote(num_groups, trainer_version)
