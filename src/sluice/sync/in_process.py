"""In-process weight sync: the engine copies the trainer's tensors by HF name (same process, any device)."""

from __future__ import annotations

from sluice.engine.protocol import EngineClient


async def push_weights(named_weights: dict, clients: list[EngineClient], version: int) -> None:
    """Send the trainer's current weights to every engine; they take them between decode steps."""
    for client in clients:
        await client.update_weights(named_weights, version)
