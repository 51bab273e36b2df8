"""The Ray placement: the run's engines, trainer ranks and Data Buffer as Ray actors.

Placement: one placement group per pool (``--colocate``: one shared group). The train pool has
``--actor-num-nodes x --actor-num-gpus-per-node`` bundles, one trainer rank each; the rollout pool has
``--rollout-num-gpus`` bundles, one engine per ``--rollout-num-gpus-per-engine`` of them. A bundle is one GPU
(and one CPU) where the cluster has GPUs, else one CPU: the same code runs the multi-process path on a laptop.
Colocated actors share their bundle's GPU (fractional GPU requests).

What stays in the driver process: the loop, the rollout manager (it reaches the engines over HTTP, through a
router when there are several), rewards, metrics and checkpoints. The Data Buffer is an actor; the trainer ranks
train data-parallel and rank 0 pushes weights to the engines (--weight-sync-method broadcast or disk).

Ray: a run joins the cluster that --ray-address or RAY_ADDRESS names (``auto`` inside a job submitted with
``ray job submit``, whose driver has RAY_ADDRESS set: the cluster the job runs in). With neither, it starts a Ray
instance on this machine for itself alone (``address="local"``: never one that ``ray start`` left running here), says
so in its log, and shuts it down at the end. Servers and process groups listen on loopback when every bundle of the
run's placement groups is on the driver's node (a restarted engine goes back to its bundle, so this holds for the
whole run); the actors are told so when they are made.
"""

from __future__ import annotations

import os
from typing import Any

from sluice.config import Config, ConfigError
from sluice.orchestration.hooks import Hooks
from sluice.orchestration.ray_actors import BufferActor, EngineActor, TrainerActor
from sluice.orchestration.ray_pools import (
    ENGINE_START_TIMEOUT_S,
    RayBuffer,
    RayBufferHandle,
    RayEnginePool,
    RayTrainerPool,
)

TRAINER_SETUP_TIMEOUT_S = 1800.0  # loading a large model on every rank takes a while
PLACEMENT_TIMEOUT_S = 120.0


def _resources(resources: dict[str, float]) -> str:
    """CPUs and GPUs of a cluster, for its log line."""
    return ", ".join(f"{resources.get(kind, 0):g} {kind}" for kind in ("CPU", "GPU"))


class RayPlacement:
    """Ray itself, the placement groups and every actor of the run."""

    def __init__(self, config: Config, log) -> None:
        import ray

        self.config, self.log = config, log
        self.started_ray = False
        if not ray.is_initialized():  # else the caller's Ray is used as it is
            self._join_or_start()
        self.use_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.engines: RayEnginePool | None = None
        self.trainer: RayTrainerPool | None = None
        self.buffer_actor = None
        self._groups = None
        try:
            self._groups = self._placement_groups()
            self.loopback = self._all_bundles_on_this_node()
        except BaseException:
            if self.started_ray:
                ray.shutdown()
            raise

    def _join_or_start(self) -> None:
        """Join the cluster --ray-address or RAY_ADDRESS names, else start Ray on this machine for this run."""
        import ray

        cluster = self.config.cluster
        address = cluster.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            source = "--ray-address" if cluster.ray_address else "RAY_ADDRESS"
            try:
                ray.init(address=address, log_to_driver=True)
            except ConnectionError as error:
                raise ConfigError(
                    f"{source}={address}: no Ray cluster to join ({error}). Start one with `ray start --head` and "
                    "submit the run with `ray job submit`, or leave --ray-address and RAY_ADDRESS unset to start Ray "
                    "on this machine for this run") from None
            nodes = [node for node in ray.nodes() if node.get("Alive")]
            self.log(f"Ray: joined the cluster at {ray.get_runtime_context().gcs_address} ({source}={address}): "
                     f"{len(nodes)} node(s), {_resources(ray.cluster_resources())}")
            return
        num_cpus = max(os.cpu_count() or 1, cluster.train_world_size + cluster.rollout_slots + 1)
        self.log(f"Ray: no --ray-address or RAY_ADDRESS, so this run starts its own Ray on this machine "
                 f"({num_cpus} CPUs) and stops it at the end. To run on a cluster, submit the run there with "
                 "`ray job submit` (see the README's cluster section) or pass --ray-address")
        # "local": a new instance even where `ray start` left one running (ray.init() would join that one)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        self.started_ray = True

    def _all_bundles_on_this_node(self) -> bool:
        """Whether every bundle of the run's placement groups is on the driver's node."""
        import ray
        from ray.util.placement_group import placement_group_table

        here = ray.get_runtime_context().get_node_id()
        return all(node == here for group, _ in self._groups.values()
                   for node in placement_group_table(group)["bundles_to_node_id"].values())

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
                ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
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

    @property
    def _share(self) -> float:
        """Each actor's share of its bundle: colocated pools split it."""
        return 0.5 if self.config.cluster.colocate else 1.0

    # ---- pools ---------------------------------------------------------------------------------------------
    def start_buffer(self, source: Any, n_samples_per_prompt: int, max_staleness: int,
                     max_held_groups: int) -> RayBuffer:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a streamed prompt source reads the prompt files as batches draw rows, at the
        # paths the driver opened.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.buffer_actor = ray.remote(BufferActor).options(num_cpus=0, scheduling_strategy=here).remote(
            source, n_samples_per_prompt, max_staleness, max_held_groups=max_held_groups)
        return RayBuffer(self.buffer_actor)

    def buffer_handle(self, buffer: RayBuffer) -> RayBufferHandle:
        return RayBufferHandle(buffer.actor)

    def start_engines(self) -> RayEnginePool:
        self.engines = RayEnginePool(self._engine_actor, self.config.cluster.num_engines)
        self.engines.wait_ready()
        self.log(f"engines: {', '.join(self.engines.urls)}")
        return self.engines

    def _engine_actor(self, index: int):
        import ray

        return ray.remote(EngineActor).options(**self._options("rollout", index, self._share)).remote(
            self.config.model.hf_checkpoint, self.config, self.loopback)

    def start_trainer(self, engines: RayEnginePool | None, hooks: Hooks | None, pad_token_id: int) -> RayTrainerPool:
        """The ranks, then their process group: rank 0 names the address to meet at, on its own node. Each rank
        loads its own trainer hooks (``hooks`` stay in the driver)."""
        import ray

        world = self.config.cluster.train_world_size
        actors = [ray.remote(TrainerActor).options(**self._options("train", rank, self._share)).remote(
            self.config, rank, world, self.loopback) for rank in range(world)]
        self.trainer = RayTrainerPool(actors, pad_token_id)
        address, port = ray.get(actors[0].rendezvous_address.remote(), timeout=ENGINE_START_TIMEOUT_S)
        try:
            ray.get([actor.setup.remote(address, port) for actor in actors], timeout=TRAINER_SETUP_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the {world} trainer ranks did not meet at {address}:{port} within "
                               f"{TRAINER_SETUP_TIMEOUT_S:.0f} s (--actor-num-nodes / --actor-num-gpus-per-node: is "
                               "every node reachable from the others?)") from None
        if engines is not None:
            self.trainer.connect_engines(engines)
        return self.trainer

    def shutdown(self) -> None:
        """Stop every actor and free the placement groups (again: a no-op)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self._groups is None:
            return
        for pool in (self.trainer, self.engines):
            if pool is not None:
                pool.shutdown()
        if self.buffer_actor is not None:
            ray.kill(self.buffer_actor)
        for group, _ in {id(g): (g, i) for g, i in self._groups.values()}.values():
            remove_placement_group(group)
        self._groups = None
        if self.started_ray:
            ray.shutdown()
