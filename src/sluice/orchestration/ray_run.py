"""A run whose parts are Ray actors: the same loop and stage verbs as LocalRun, with the pools placed by Ray.

Placement: one placement group per pool (``--colocate``: one shared group). The train pool has
``--actor-num-nodes x --actor-num-gpus-per-node`` bundles, one trainer rank each; the rollout pool has
``--rollout-num-gpus`` bundles, one engine per ``--rollout-num-gpus-per-engine`` of them. A bundle is one GPU
(and one CPU) where the cluster has GPUs, else one CPU: the same code runs the multi-process path on a laptop.
Colocated actors share their bundle's GPU (fractional GPU requests).

What stays in this (driver) process: the loop, the rollout manager (it reaches the engines over HTTP, through
a router when there are several), rewards, metrics and checkpoints. The Data Buffer is an actor; the trainer
ranks train data-parallel and rank 0 pushes weights to the engines (--weight-sync-method broadcast or disk).

Ray is started on this machine unless --ray-address or RAY_ADDRESS names a cluster; it is shut down at the
end only if this run started it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from sluice.config import Config, ConfigError
from sluice.engine.clients.http import HttpEngineClient
from sluice.engine.clients.router import MultiEngineClient
from sluice.orchestration.local_run import LocalRun, held_groups
from sluice.orchestration.ray_actors import BufferActor, EngineActor, TrainerActor
from sluice.rollout.manager import cancel_tasks
from sluice.types import SampleGroup

ENGINE_START_TIMEOUT_S = 600.0
TRAINER_SETUP_TIMEOUT_S = 1800.0  # loading a large model on every rank takes a while
ENGINE_PROBE_TIMEOUT_S = 60.0  # a live engine answers a one-token generation well within this
ENGINE_WATCH_INTERVAL_S = 10.0  # how often the async loop probes the engines


class RayPools:
    """Ray itself, the placement groups and every actor of the run."""

    def __init__(self, config: Config, log) -> None:
        import ray

        self.config, self.log = config, log
        cluster = config.cluster
        self.started_ray = False
        if not ray.is_initialized():
            address = cluster.ray_address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                # on this machine only: every actor is here, so servers and process groups stay on loopback
                os.environ["SLUICE_RAY_LOCAL"] = "1"
                needed = cluster.train_world_size + cluster.rollout_slots + 1
                ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, log_to_driver=True,
                         runtime_env={"env_vars": {"SLUICE_RAY_LOCAL": "1"}})
                self.started_ray = True
        self.use_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.engines: list[Any] = []
        self.engine_urls: list[str] = []
        self.trainers: list[Any] = []
        self.buffer = None
        self._groups = None
        try:
            self._groups = self._placement_groups()
        except BaseException:
            if self.started_ray:
                ray.shutdown()
            raise

    def _bundle(self) -> dict[str, float]:
        return {"GPU": 1, "CPU": 1} if self.use_gpus else {"CPU": 1}

    def _placement_groups(self) -> dict[str, tuple[Any, int]]:
        """pool -> (placement group, first bundle index); colocated pools share one group."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        cluster = self.config.cluster
        train = cluster.train_world_size
        if cluster.colocate:
            group = placement_group([self._bundle()] * max(train, cluster.rollout_slots), strategy="PACK")
            groups = {"train": (group, 0), "rollout": (group, 0)}
        else:
            groups = {"train": (placement_group([self._bundle()] * train, strategy="PACK"), 0),
                      "rollout": (placement_group([self._bundle()] * cluster.rollout_slots, strategy="PACK"), 0)}
        distinct = [g for g, _ in {id(g): (g, i) for g, i in groups.values()}.values()]
        for group in distinct:
            try:
                ray.get(group.ready(), timeout=120)
            except ray.exceptions.GetTimeoutError:
                for made in distinct:
                    remove_placement_group(made)
                raise ConfigError(f"Ray could not place {len(group.bundle_specs)} bundles of {self._bundle()} "
                                  f"(cluster resources: {ray.cluster_resources()}); lower --actor-num-gpus-per-node "
                                  "/ --rollout-num-gpus or add nodes") from None
        return groups

    def _options(self, pool: str, bundle: int, share: float) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, first = self._groups[pool]
        options = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=first + bundle), "max_restarts": 0}
        if self.use_gpus:
            options.update(num_gpus=share, num_cpus=share)
        else:
            options.update(num_cpus=share)
        return options

    # ---- pools ---------------------------------------------------------------------------------------------
    def start_buffer(self, *args, **kwargs):
        import ray

        self.buffer = ray.remote(BufferActor).options(num_cpus=0).remote(*args, **kwargs)
        return RayBuffer(self.buffer)

    def start_engines(self, checkpoint: str) -> list[str]:
        import ray

        self.checkpoint = checkpoint
        self.engines = [self._engine_actor(i) for i in range(self.config.cluster.num_engines)]
        self.engine_urls = ray.get([engine.url.remote() for engine in self.engines], timeout=ENGINE_START_TIMEOUT_S)
        return self.engine_urls

    def _engine_actor(self, index: int):
        import ray

        share = 0.5 if self.config.cluster.colocate else 1.0
        return ray.remote(EngineActor).options(**self._options("rollout", index, share)).remote(self.checkpoint,
                                                                                             self.config)

    def lost_engines(self, timeout_s: float | None = None) -> list[int]:
        """Engines whose actor died, or whose engine does not generate one token within ``timeout_s`` (default
        ENGINE_PROBE_TIMEOUT_S)."""
        import httpx
        import ray

        timeout_s = timeout_s or ENGINE_PROBE_TIMEOUT_S
        lost = []
        for index, (engine, url) in enumerate(zip(self.engines, self.engine_urls)):
            try:
                ray.get(engine.weight_version.remote(), timeout=timeout_s)
                httpx.get(url + "/health_generate", timeout=timeout_s).raise_for_status()
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, httpx.HTTPError):
                lost.append(index)
        return lost

    def restart_engines(self, indices: list[int]) -> None:
        """New engine actors in the lost ones' bundles (the old ones are killed first, stuck or dead)."""
        import ray

        for index in indices:
            ray.kill(self.engines[index])
            self.engines[index] = self._engine_actor(index)
        for index in indices:
            self.engine_urls[index] = ray.get(self.engines[index].url.remote(), timeout=ENGINE_START_TIMEOUT_S)

    def start_trainers(self) -> "RayTrainPool":
        """The ranks, then their process group: rank 0 names the address to meet at, on its own node."""
        import ray

        world = self.config.cluster.train_world_size
        share = 0.5 if self.config.cluster.colocate else 1.0
        self.trainers = [ray.remote(TrainerActor).options(**self._options("train", rank, share)).remote(
            self.config, rank, world) for rank in range(world)]
        address, port = ray.get(self.trainers[0].rendezvous_address.remote(), timeout=ENGINE_START_TIMEOUT_S)
        try:
            ray.get([trainer.setup.remote(address, port) for trainer in self.trainers], timeout=TRAINER_SETUP_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the {world} trainer ranks did not meet at {address}:{port} within "
                               f"{TRAINER_SETUP_TIMEOUT_S:.0f} s (--actor-num-nodes / --actor-num-gpus-per-node: is "
                               "every node reachable from the others?)") from None
        return RayTrainPool(self.trainers)

    def shutdown(self) -> None:
        """Stop every actor and free the placement groups (again: a no-op)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self._groups is None:
            return
        for actor in [*self.trainers, *self.engines]:
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead actor has nothing left to stop
                pass
        for actor in [*self.trainers, *self.engines, *([self.buffer] if self.buffer is not None else [])]:
            ray.kill(actor)
        for group, _ in {id(g): (g, i) for g, i in self._groups.values()}.values():
            remove_placement_group(group)
        self._groups = None
        if self.started_ray:
            ray.shutdown()


class RayBuffer:
    """The buffer actor, called as a DataBuffer (blocking, from the sync loop and checkpoints) or through
    ``call`` (awaited, from the async producer)."""

    def __init__(self, actor) -> None:
        self.actor = actor

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.actor, method).remote(*args)

    def _get(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(getattr(self.actor, method).remote(*args, **kwargs))

    @property
    def weight_version(self) -> int:
        return self._get("get_weight_version")

    def __getattr__(self, method: str):
        """Any public DataBuffer method, run on the actor (plug-ins given the buffer may call any of them)."""
        if method.startswith("_") or not callable(getattr(BufferActor, method, None)):
            raise AttributeError(f"the buffer actor has no method {method!r}")
        return lambda *args, **kwargs: self._get(method, *args, **kwargs)


class RayTrainPool:
    """The trainer ranks as one trainer: every call goes to all ranks (data-parallel), results come from rank 0."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        # every rank must receive the calls in one order (collectives): submit one fan-out at a time
        self._submit = threading.Lock()

    def _submit_all(self, method: str, *args: Any) -> list[Any]:
        import ray

        args = tuple(ray.put(a) if isinstance(a, (list, dict)) else a for a in args)  # serialised once, not per rank
        with self._submit:
            return [getattr(actor, method).remote(*args) for actor in self.actors]

    def _all(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get(self._submit_all(method, *args))

    def train(self, groups: list[SampleGroup], rewards: list[list[float]], train_actor: bool,
              pad_token_id: int) -> dict[str, float]:
        results = self._all("train", groups, rewards, train_actor, pad_token_id)
        merged = dict(results[0])  # the same on every rank, but each rank's own peak memory
        for result in results[1:]:
            merged.update({key: value for key, value in result.items() if key.startswith("perf/peak_gpu")})
        return merged

    def update_reference(self) -> None:
        self._all("update_reference")

    def offload(self) -> None:
        self._all("offload")

    def onload(self) -> None:
        self._all("onload")

    def connect_engines(self, urls: list[str]) -> None:
        import ray

        ray.get(self.actors[0].connect_engines.remote(urls))

    async def push_weights(self, version: int) -> dict[str, float]:
        results = await asyncio.gather(*self._submit_all("push_weights", version))
        return results[0]

    def state_dict(self, with_optimizer: bool = True) -> dict:
        return self._all("state_dict", with_optimizer)[0]

    def load_state_dict(self, state: dict) -> None:
        self._all("load_state_dict", state)

    def weight_checksums(self) -> dict[str, int]:
        return self._all("weight_checksums")[0]

    @property
    def model(self):
        """A CPU copy of the actor model, for HF exports written by this process."""
        return self._all("model_on_cpu")[0]


class RayRun(LocalRun):
    def __init__(self, config: Config, log=print):
        self.num_engine_restarts = 0
        self.pushed_version = 0
        self._recovery: tuple[Any, asyncio.Lock] | None = None
        self._watcher: asyncio.Task | None = None
        self.pools = RayPools(config, log)
        try:
            super().__init__(config, log)
        except BaseException:
            self.pools.shutdown()
            raise

    def _make_buffer(self, config: Config):
        return self.pools.start_buffer(self.source, config.rollout.n_samples_per_prompt, config.staleness_bound,
                                       max_held_groups=held_groups(config))

    def _start_engines(self, config: Config, checkpoint: str):
        import ray

        urls = self.pools.start_engines(checkpoint)
        self.log_line(f"engines: {', '.join(urls)}")
        context_len = ray.get(self.pools.engines[0].context_len.remote())
        return MultiEngineClient([HttpEngineClient(url) for url in urls]), context_len

    def _start_trainer(self, config: Config, checkpoint: str):
        pool = self.pools.start_trainers()
        if self.pools.engine_urls:
            pool.connect_engines(self.pools.engine_urls)
        return pool

    def _update_policy(self, groups: list[SampleGroup], rewards: list[list[float]], train_actor: bool) -> dict:
        return self.trainer.train(groups, rewards, train_actor, self.tokenizer.pad_token_id or 0)

    async def _push(self, version: int) -> dict[str, float]:
        async with self._recovery_lock():  # never interleaved with a recovery's own push
            metrics = await self.trainer.push_weights(version)
        self.pushed_version = version
        return metrics

    def buffer_handle(self):
        return self.buffer

    def _engine_recovery(self):
        return self.recover_engines

    async def recover_engines(self) -> None:
        """Restart the engines that died or hang, push them the current weights, and route to them again.
        Called when a request lost its engine, and every ENGINE_WATCH_INTERVAL_S by the async loop's watcher."""
        async with self._recovery_lock():
            lost = await asyncio.to_thread(self.pools.lost_engines)
            if not lost:
                return
            self.log_line(f"engines lost: {', '.join(self.pools.engine_urls[i] for i in lost)}; restarting")
            await asyncio.to_thread(self.pools.restart_engines, lost)
            for index in lost:
                await self.client.clients[index].aclose()
                self.client.clients[index] = HttpEngineClient(self.pools.engine_urls[index])
            if self.trainer is not None:  # labelled with the last pushed version: never older than the engines have
                await asyncio.to_thread(self.trainer.connect_engines, self.pools.engine_urls)
                await self.trainer.push_weights(self.pushed_version)
            self.num_engine_restarts += len(lost)
            self.log_line(f"engines restarted and re-synced: {', '.join(self.pools.engine_urls[i] for i in lost)}")

    def _recovery_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()  # the sync loop runs each rollout on a fresh event loop
        if self._recovery is None or self._recovery[0] is not loop:
            self._recovery = (loop, asyncio.Lock())
        return self._recovery[1]

    def start_producer(self):
        producer = super().start_producer()
        self._watcher = asyncio.ensure_future(self._watch_engines())
        return producer

    async def _watch_engines(self) -> None:
        """Probe the engines now and then, so a hung engine (no error, no progress) is found and replaced."""
        while True:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
            try:
                await self.recover_engines()
            except Exception as error:  # noqa: BLE001 - logged; the next probe tries again
                self.log_line(f"engine watch: {type(error).__name__}: {error}")

    async def stop_producer(self, producer) -> None:
        if self._watcher is not None:
            await cancel_tasks([self._watcher])
            self._watcher = None
        await super().stop_producer(producer)

    def _move_engines(self, to_device: bool) -> None:
        import ray

        ray.get([(e.resume_memory if to_device else e.release_memory).remote() for e in self.pools.engines])

    def _stop_pools(self) -> None:
        self.pools.shutdown()


def start_run(config: Config, log=print) -> LocalRun:
    """The run the config asks for: in this process, or placed by Ray."""
    return RayRun(config, log) if config.cluster.distributed else LocalRun(config, log)
