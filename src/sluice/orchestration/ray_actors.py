"""The Ray actors of a distributed run: engines, trainers and the Data Buffer.

- ``EngineActor``: one LocalEngine behind its HTTP server (SGLang's native API), on the actor's device. The
  rollout reaches it over HTTP, as it would a real SGLang server, and weights arrive through the same routes.
- ``TrainerActor``: one rank of the train pool. Ranks join one torch.distributed group (gloo on CPU, NCCL on
  GPU) and train data-parallel; every rank gets the whole rollout and runs its share of the micro-batches
  (trainer/data_parallel.py). Rank 0 also pushes weights to the engines.
- ``BufferActor``: the DataBuffer itself, its methods called one at a time by Ray.

Actors are created by ``sluice.orchestration.ray_placement`` into placement-group bundles and driven through the
pools of ``sluice.orchestration.ray_pools``; nothing here decides placement. ``loopback`` (a constructor
argument): every actor of the run is on this machine, so servers and process groups listen on 127.0.0.1.
Engine servers check the run's key (orchestration/engine_access.py), which the config brings them; the trainer's
weight sync sends it.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import torch

from sluice.buffer import DataBuffer
from sluice.config import Config
from sluice.observability.step_metrics import peak_gpu_memory
from sluice.types import Sample, SampleGroup


def node_address(loopback: bool) -> str:
    """The address other actors reach this one at (127.0.0.1 when they all run on this machine)."""
    import ray

    return "127.0.0.1" if loopback else ray.util.get_node_ip_address()


class EngineActor:
    def __init__(self, model_path: str, config: Config, loopback: bool) -> None:
        from sluice.engine.local_engine import LocalEngine
        from sluice.engine.server.app import BackgroundServer
        from sluice.engine.server.context import ServerContext

        self.config = config
        self.engine = LocalEngine(model_path, config.engine)
        context = ServerContext(self.engine, model_path, model_path, config.engine)
        self.server = BackgroundServer(context, host=node_address(loopback), port=0).start()

    def url(self) -> str:
        return self.server.url

    def client_key(self) -> str | None:
        """The key the run's clients send to this server (from the run's config, which the driver holds too)."""
        from sluice.orchestration.engine_access import engine_client_key

        return engine_client_key(self.config.engine)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def context_len(self) -> int:
        return self.engine.context_len

    def pid(self) -> int:
        return os.getpid()

    def pause(self) -> None:
        """Hold generation (requests wait); to the run's health probe this engine looks hung."""
        self.engine.pause()

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def shutdown(self) -> None:
        self.server.stop()
        self.engine.shutdown()


class TrainerActor:
    def __init__(self, config: Config, rank: int, world_size: int, loopback: bool) -> None:
        self.config, self.rank, self.world_size, self.loopback = config, rank, world_size, loopback
        self.sync = None
        self._loop = asyncio.new_event_loop()  # one loop for every push: the sync's HTTP client stays connected

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: where the other ranks meet it (its own node's address and a free port there)."""
        from sluice.sync.broadcast import free_port

        address = node_address(self.loopback)
        return address, free_port(address)

    def setup(self, master_address: str, master_port: int) -> int:
        """Join the train pool's process group (every rank at once), then load the trainer."""
        if self.world_size > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(0)  # Ray shows each trainer its own GPU as device 0
            torch.distributed.init_process_group(backend, init_method=f"tcp://{master_address}:{master_port}",
                                                 rank=self.rank, world_size=self.world_size,
                                                 timeout=timedelta(minutes=30))
        from sluice.orchestration.hooks import load_trainer_hooks
        from sluice.trainer.torch_backend import TorchTrainer

        config = self.config
        self.hooks = load_trainer_hooks(config)
        group = torch.distributed.group.WORLD if self.world_size > 1 else None
        self.trainer = TorchTrainer(config.model.hf_checkpoint, config.train, config.algorithm,
                                    config.rollout.trainer_temperature, config.model.ref_load,
                                    custom_loss=self.hooks.loss, process_group=group)
        return self.rank

    def train(self, groups: list[SampleGroup], rewards: list[list[float]], train_actor: bool,
              pad_token_id: int) -> dict[str, float]:
        """One rollout's policy (and critic) update, data-parallel over the pool; the same metrics on every rank."""
        from sluice.trainer.update import update_policy

        config = self.config
        skipped_before = self.trainer.guard.num_skipped
        metrics = update_policy(self.trainer, groups, config.algorithm, rewards, config.global_batch_size,
                                pad_token_id, config.rollout.rollout_max_response_len, train_actor=train_actor,
                                advantage_fn=self.hooks.advantage)
        metrics["train/nonfinite_skipped_steps"] = float(self.trainer.guard.num_skipped - skipped_before)
        metrics["train/nonfinite_skipped_total"] = float(self.trainer.guard.num_skipped)
        metrics.update({f"{key}_trainer_rank{self.rank}": value for key, value in peak_gpu_memory().items()})
        return metrics

    def held_out_loss(self, samples: list[Sample], pad_token_id: int):
        """The SFT loss of held-out rows (a HeldOutLoss); every rank runs it on the same rows, with one result."""
        from sluice.trainer.held_out import held_out_loss

        return held_out_loss(self.trainer, samples, pad_token_id, self.config.global_batch_size)

    def update_reference(self) -> None:
        self.trainer.update_reference()

    def offload(self) -> None:
        self.trainer.offload()

    def onload(self) -> None:
        self.trainer.onload()

    def state_dict(self, with_optimizer: bool = True) -> dict | None:
        """Every rank calls it (a collective under FSDP); rank 0 returns the state, the others None."""
        state = self.trainer.state_dict(with_optimizer)
        return state if self.rank == 0 else None

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)

    def model_on_cpu(self):
        """Rank 0: a CPU copy of the actor model, for an HF export written by the driver; other ranks: None.
        Every rank calls it (gathering sharded weights is a collective)."""
        from transformers import AutoModelForCausalLM

        weights = self.trainer.named_weights()
        if self.rank != 0:
            return None
        model = AutoModelForCausalLM.from_config(self.trainer.model.config, dtype=next(iter(weights.values())).dtype)
        model.load_state_dict({name: tensor.to("cpu") for name, tensor in weights.items()})
        return model

    def weight_checksums(self) -> dict[str, int]:
        """Per-tensor checksums of the actor's weights, as an engine's /get_weights_checksum reports them."""
        from sluice.sync.verify import expected_checksums

        weights = self.trainer.named_weights()
        return expected_checksums(weights) if self.rank == 0 else None

    # ---- weight sync (rank 0) -----------------------------------------------------------------------------
    def connect_engines(self, engine_urls: list[str]) -> None:
        """Set up the weight sync to these engines (--weight-sync-method), replacing any earlier one."""
        from sluice.orchestration.engine_access import engine_client_key
        from sluice.sync.factory import make_weight_sync

        if self.sync is not None:
            self._loop.run_until_complete(self.sync.close())
        self.sync = make_weight_sync(self.config.sync, list(engine_urls), device=self.trainer.device,
                                     run_dir=self.config.logging.run_dir, colocated=self.config.cluster.colocate,
                                     api_key=engine_client_key(self.config.engine))
        self._loop.run_until_complete(self.sync.connect())

    def push_weights(self, version: int) -> dict[str, float]:
        """Every rank calls this (gathering full tensors may be a collective); rank 0 sends them."""
        weights = self.trainer.named_weights()
        if self.sync is None:
            return {}
        report = self._loop.run_until_complete(self.sync.push(weights, version))
        return {"sync/seconds": report.seconds, "sync/bytes": float(report.num_bytes),
                "sync/buckets": float(report.num_buckets)}

    def shutdown(self) -> None:
        if self.sync is not None:
            self._loop.run_until_complete(self.sync.close())
        self._loop.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class BufferActor(DataBuffer):
    """The DataBuffer as an actor: Ray runs its methods one at a time; properties are reached through counts()."""

    def get_weight_version(self) -> int:
        return self.weight_version
