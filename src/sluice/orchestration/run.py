"""A built run: the parts the loops call, held together (orchestration/builder.py makes them).

Nothing here runs a stage; each part has one job. ``close`` stops everything, in order, at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sluice.buffer.handle import BlockingBuffer
from sluice.config import Config
from sluice.observability.plots import plot_curves
from sluice.observability.step_log import StepLog
from sluice.orchestration.checkpointing import RunCheckpoints
from sluice.orchestration.offload import OffloadTurns
from sluice.orchestration.pools import EnginePool, Placement, TrainerPool
from sluice.orchestration.schedule import Schedule
from sluice.orchestration.sft_eval import SftEval
from sluice.orchestration.weight_updates import WeightUpdates
from sluice.rollout.batches import RolloutBatches
from sluice.rollout.evaluator import Evaluator
from sluice.rollout.gateway import AgentGateway
from sluice.rollout.manager import RolloutManager

T = TypeVar("T")


@dataclass
class Run:
    config: Config
    tokenizer: Any
    source: Any  # the prompt source behind the buffer (PromptSource, or --data-source-path's)
    buffer: BlockingBuffer
    engines: EnginePool | None  # None with --debug-train-only
    trainer: TrainerPool | None  # None with --debug-rollout-only
    rollout: RolloutManager
    batches: RolloutBatches  # each step's batch, generated (or taken from the async producer) and finished
    evaluator: Evaluator
    sft_eval: SftEval  # --eval-sft-data: held-out SFT losses from the trainer (no sets: nothing)
    weights: WeightUpdates
    offload: OffloadTurns
    checkpoints: RunCheckpoints
    log: StepLog
    schedule: Schedule
    placement: Placement
    loop: asyncio.AbstractEventLoop  # the run's one event loop: see run_async
    gateway: AgentGateway | None = None
    reward_fn: Any = None  # closed at the end when it holds connections (a remote reward)
    log_line: Callable[[str], None] = print

    def run_async(self, coroutine: Awaitable[T]) -> T:
        """Run ``coroutine`` to its end on the run's event loop. One loop for the whole run, so engine clients keep
        their connections (an HTTP client is bound to the loop it was made on) and locks stay meaningful."""
        return self.loop.run_until_complete(coroutine)

    def close(self) -> Path:
        """Stop the engines and trainer, close the trackers and draw the curves; returns the PNG path."""
        self.log.close()
        stop_parts(self.loop, self.placement, self.gateway, [self.engines.client if self.engines else None,
                                                             self.reward_fn], self.log_line)
        run_dir = Path(self.config.logging.run_dir)
        return plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")


def stop_parts(loop: asyncio.AbstractEventLoop, placement: Placement | None, gateway: AgentGateway | None,
               connection_owners: list[Any], log_line: Callable[[str], None]) -> None:
    """The gateway, then the connection pools (an engine client's, a remote reward's) on the loop that opened
    them, then every pool the placement started, then the loop itself."""
    if gateway is not None:
        gateway.stop()
    for owner in connection_owners:
        closer = getattr(owner, "aclose", None)
        if closer is not None and not loop.is_closed():
            try:
                loop.run_until_complete(closer())
            except Exception as error:  # noqa: BLE001 - the run is over; a failed close only leaks sockets
                log_line(f"closing connections: {type(error).__name__}: {error}")
    if placement is not None:
        placement.shutdown()  # an engine's worker thread (or actor) would otherwise outlive the run
    if not loop.is_closed():
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
