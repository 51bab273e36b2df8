"""In-process weight sync: the engine copies the trainer's tensors by HF name (same process, any device).

The copy goes straight from the trainer's tensor into the engine's parameter (``Tensor.copy_``), so a colocated
trainer and engine on one GPU sync device to device, with no host round trip. The engine checks the tensors'
checksums before the first copy, and copies between two of its steps.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Sequence

from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import EngineClient
from sluice.sync.interface import (
    EngineResult,
    NamedWeights,
    SyncReport,
    WeightSync,
    WeightSyncError,
    distinct_weights,
    num_bytes,
)
from sluice.weights.buckets import named_checksums

if TYPE_CHECKING:  # an in-process engine is reached through its own methods; no runtime import of the engine
    from sluice.engine.local_engine import LocalEngine


async def push_weights(named_weights: dict, clients: list[EngineClient], version: int) -> None:
    """Send the trainer's current weights to every engine; they take them between decode steps."""
    for client in clients:
        await client.update_weights(named_weights, version)


class InProcessSync(WeightSync):
    method = "in_process"

    def __init__(self, engines: Sequence[LocalEngine | InProcessClient], verify: bool = True):
        """``verify``: send checksums for the engine to check (one extra read of the weights on each side)."""
        if not engines:
            raise ValueError("an in-process sync needs at least one engine")
        self.engines = [e.engine if isinstance(e, InProcessClient) else e for e in engines]
        self.verify = verify

    async def push(self, named_weights: NamedWeights, version: int) -> SyncReport:
        started = time.perf_counter()
        weights = distinct_weights(named_weights)
        checksums = await asyncio.to_thread(named_checksums, weights) if self.verify else None
        results = []
        for index, engine in enumerate(self.engines):
            name = f"in-process engine #{index}"
            try:
                count = await asyncio.to_thread(engine.update_weights, weights, version, checksums)
            except (ValueError, KeyError, TypeError) as error:
                raise WeightSyncError(f"weight sync to version {version} failed at stage 'apply': {name} "
                                      f"refused: {error}", engine=name, stage="apply") from error
            results.append(EngineResult(name, True, f"loaded {count} tensors; weight version {version}"))
        return SyncReport(self.method, version, time.perf_counter() - started, num_bytes(weights), 1, results)
