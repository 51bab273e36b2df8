"""The in-process placement: one engine and one trainer in this process (a local run on one machine).

The engine is a LocalEngine reached through an InProcessClient; the trainer a TorchTrainer; the Data Buffer a
plain DataBuffer. Engine and trainer share the process (and, on a GPU, the device: --offload-* lets them take
turns). Weights go to the engine in process (--weight-sync-method in_process) or through disk.
"""

from __future__ import annotations

from typing import Any

from sluice.buffer import DataBuffer
from sluice.buffer.handle import LocalBufferHandle
from sluice.config import Config
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.local_engine import LocalEngine
from sluice.observability.step_metrics import peak_gpu_memory
from sluice.orchestration.hooks import Hooks
from sluice.orchestration.oom import OomAdvice
from sluice.sync.factory import make_weight_sync
from sluice.sync.verify import expected_checksums
from sluice.trainer.torch_backend import TorchTrainer
from sluice.trainer.update import update_policy
from sluice.trainer.held_out import HeldOutLoss, held_out_loss
from sluice.types import Sample, SampleGroup


class LocalEnginePool:
    """One LocalEngine of this process (its worker thread steps the scheduler)."""

    can_restart = False  # an engine in this process is not lost without the process

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.urls: list[str] = []  # no HTTP server: the rollout calls the engine directly
        self.client = InProcessClient(engine)
        self.context_len = engine.context_len

    def lost(self, timeout_s: float | None = None) -> list[int]:
        return []

    async def restart(self, indices: list[int]) -> None:
        raise RuntimeError("an engine in this process cannot be restarted")

    def offload(self) -> None:
        self.engine.release_memory()

    def onload(self) -> None:
        self.engine.resume_memory()

    def shutdown(self) -> None:
        self.engine.shutdown()


class LocalTrainerPool:
    """One TorchTrainer of this process (``backend``); its weight sync is made at the first push."""

    def __init__(self, backend: TorchTrainer, config: Config, hooks: Hooks, pad_token_id: int,
                 memory: OomAdvice) -> None:
        self.backend = backend
        self.algorithm, self.sync_config = config.algorithm, config.sync
        self.global_batch_size = config.global_batch_size
        self.max_response_len = config.rollout.rollout_max_response_len
        self.run_dir = config.logging.run_dir
        self.advantage_fn = hooks.advantage
        self.pad_token_id, self.memory = pad_token_id, memory
        self.engines: list[LocalEngine] = []
        self.weight_sync = None

    def train(self, groups: list[SampleGroup], rewards: list[list[float]], train_actor: bool) -> dict[str, float]:
        guard = self.backend.guard
        skipped_before = guard.num_skipped
        with self.memory.explain("train"):
            metrics = update_policy(self.backend, groups, self.algorithm, rewards, self.global_batch_size,
                                    self.pad_token_id, self.max_response_len, train_actor=train_actor,
                                    advantage_fn=self.advantage_fn)
        metrics["train/nonfinite_skipped_steps"] = float(guard.num_skipped - skipped_before)
        metrics["train/nonfinite_skipped_total"] = float(guard.num_skipped)
        metrics.update(peak_gpu_memory())  # engine and trainer together: they share this process
        return metrics

    def held_out_loss(self, samples: list[Sample]) -> HeldOutLoss:
        return held_out_loss(self.backend, samples, self.pad_token_id, self.global_batch_size)

    def update_reference(self) -> None:
        self.backend.update_reference()

    def offload(self) -> None:
        self.backend.offload()

    def onload(self) -> None:
        self.backend.onload()

    def connect_engines(self, engines: LocalEnginePool) -> None:
        self.engines, self.weight_sync = [engines.engine], None

    async def push_weights(self, version: int) -> dict[str, float]:
        """The weights to the engine, as ``version`` (--weight-sync-method: in_process or disk)."""
        if self.weight_sync is None:
            self.weight_sync = make_weight_sync(self.sync_config, self.engines, device=self.backend.device,
                                                run_dir=self.run_dir)
        report = await self.weight_sync.push(self.backend.named_weights(), version)
        return {"sync/seconds": report.seconds, "sync/bytes": float(report.num_bytes)}

    def state_dict(self, with_optimizer: bool = True) -> dict[str, Any]:
        return self.backend.state_dict(with_optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backend.load_state_dict(state)

    def weight_checksums(self) -> dict[str, int]:
        return expected_checksums(self.backend.named_weights())

    @property
    def model(self) -> Any:
        return self.backend.model

    def shutdown(self) -> None:
        pass  # nothing runs beside this process's own threads


class LocalPlacement:
    """Everything in this process."""

    def __init__(self, config: Config, memory: OomAdvice) -> None:
        self.config, self.memory = config, memory
        self.engines: LocalEnginePool | None = None

    def start_buffer(self, source: Any, n_samples_per_prompt: int, max_staleness: int,
                     max_held_groups: int) -> DataBuffer:
        return DataBuffer(source, n_samples_per_prompt, max_staleness, max_held_groups=max_held_groups)

    def buffer_handle(self, buffer: DataBuffer) -> LocalBufferHandle:
        return LocalBufferHandle(buffer)

    def start_engines(self) -> LocalEnginePool:
        with self.memory.explain("engine start"):
            self.engines = LocalEnginePool(LocalEngine(self.config.model.hf_checkpoint, self.config.engine))
        return self.engines

    def start_trainer(self, engines: LocalEnginePool | None, hooks: Hooks, pad_token_id: int) -> LocalTrainerPool:
        config = self.config
        with self.memory.explain("train"):
            backend = TorchTrainer(config.model.hf_checkpoint, config.train, config.algorithm,
                                   config.rollout.trainer_temperature, config.model.ref_load, custom_loss=hooks.loss)
        pool = LocalTrainerPool(backend, config, hooks, pad_token_id, self.memory)
        if engines is not None:
            pool.connect_engines(engines)
        return pool

    def shutdown(self) -> None:
        if self.engines is not None:
            self.engines.shutdown()
            self.engines = None

