"""The typed interfaces a placement backend implements: where the engines and the trainer run is hidden
behind them, so the loop and every other part call the same methods in one process or on Ray actors.

- ``EnginePool``: the inference engines and the rollout's client to them (orchestration/local_pools.py: one
  engine in this process; orchestration/ray_pools.py: engine actors behind their HTTP servers, routed).
- ``TrainerPool``: the trainer, one or many data-parallel ranks seen as one.
- ``Placement``: makes the pools and the Data Buffer (buffer/handle.py has the buffer's interfaces) and frees
  them at the end.
"""

from __future__ import annotations

from typing import Any, Protocol

from sluice.buffer.handle import BlockingBuffer, BufferHandle
from sluice.engine.clients.protocol import EngineClient
from sluice.orchestration.hooks import Hooks
from sluice.trainer.held_out import HeldOutLoss
from sluice.types import Sample, SampleGroup


class EnginePool(Protocol):
    client: EngineClient  # what the rollout generates through (a router over several engines)
    context_len: int  # the longest sequence the engines take
    urls: list[str]  # the engines' HTTP servers; empty for engines in this process
    can_restart: bool  # whether a lost engine can be replaced (an engine in this process dies with it)

    def lost(self, timeout_s: float | None = None) -> list[int]:
        """Indices of engines that died or do not generate within ``timeout_s``."""

    async def restart(self, indices: list[int]) -> None:
        """Replace the engines at ``indices`` (with the weights they started with) and route to them again."""

    def offload(self) -> None:
        """Free the engines' KV cache and weights on the device (--offload-rollout)."""

    def onload(self) -> None:
        """Bring back what ``offload`` freed."""

    def shutdown(self) -> None: ...


class TrainerPool(Protocol):
    def train(self, groups: list[SampleGroup], rewards: list[list[float]], train_actor: bool) -> dict[str, float]:
        """One rollout's policy (and critic) update; ``train_actor`` False updates the critic only."""

    def held_out_loss(self, samples: list[Sample]) -> HeldOutLoss:
        """The SFT loss of ``samples`` (rows with responses from the data) under the current weights, no update."""

    def update_reference(self) -> None:
        """The reference model becomes the current policy (--ref-update-interval)."""

    def offload(self) -> None:
        """Move the trainer to host memory (--offload-train)."""

    def onload(self) -> None: ...

    def connect_engines(self, engines: EnginePool) -> None:
        """Set up the weight sync to ``engines`` (--weight-sync-method), replacing any earlier one."""

    async def push_weights(self, version: int) -> dict[str, float]:
        """Send the trainer's weights to the connected engines as ``version``; returns sync/... metrics."""

    def state_dict(self, with_optimizer: bool = True) -> dict[str, Any]:
        """Everything a resume needs. In-process it shares storage with the live trainer (no copy of weights or
        moments is made): write it to a checkpoint, or copy it, before the next ``train``."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def weight_checksums(self) -> dict[str, int]:
        """Per-tensor checksums of the actor's weights, as an engine's /get_weights_checksum reports them."""

    @property
    def model(self) -> Any:
        """The actor model for exports written by this process (``checkpoint.hf_export.export_hf`` writes either
        kind under HF names): a transformers model, or sluice's ``DecoderLM`` where the trainer runs it."""

    def shutdown(self) -> None: ...


class Placement(Protocol):
    def start_buffer(self, source: Any, n_samples_per_prompt: int, max_staleness: int,
                     max_held_groups: int) -> BlockingBuffer:
        """The Data Buffer over the prompt ``source``."""

    def buffer_handle(self, buffer: BlockingBuffer) -> BufferHandle:
        """``buffer`` as the async producer awaits it."""

    def start_engines(self) -> EnginePool: ...

    def start_trainer(self, engines: EnginePool | None, hooks: Hooks, pad_token_id: int) -> TrainerPool:
        """The trainer, connected to ``engines`` (None: --debug-train-only) for weight syncs."""

    def shutdown(self) -> None:
        """Stop everything this placement started (again: a no-op)."""

