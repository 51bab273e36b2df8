"""Checking that engines hold exactly the trainer's weights: compare per-tensor checksums (weights/buckets.py)
of the trainer's tensors with those an engine reports (``/get_weights_checksum``, ``LocalEngine.weight_checksums``)."""

from __future__ import annotations

import httpx
import torch

from sluice.net.transport import bearer_headers
from sluice.sync.engine_calls import call_engine
from sluice.sync.interface import NamedWeights
from sluice.weights.buckets import named_checksums


def expected_checksums(named_weights: NamedWeights, dtype: torch.dtype | None = None) -> dict[str, int]:
    """The trainer's checksums, of its tensors cast to ``dtype`` when the engine holds another dtype."""
    if dtype is not None:
        named_weights = {name: tensor.to(dtype) for name, tensor in named_weights.items()}
    return named_checksums(named_weights)


async def engine_checksums(url: str, timeout_s: float = 60.0,
                           api_key: str | None = None) -> tuple[int, dict[str, int]]:
    """An engine server's weight version and per-tensor checksums (``api_key``: the engine's admin key, if any)."""
    async with httpx.AsyncClient(headers=bearer_headers(api_key)) as http:
        body = await call_engine(http, url.rstrip("/"), "/get_weights_checksum", None, timeout_s)
    return int(body["weight_version"]), {name: int(value) for name, value in body["checksums"].items()}


def checksum_differences(expected: dict[str, int], reported: dict[str, int]) -> list[str]:
    """Every engine weight the trainer lacks or holds with other bytes (trainer-only names, e.g. a tied
    lm_head the engine keeps as the embedding, are not the engine's to report)."""
    problems = [f"{name}: not among the trainer's weights" for name in reported if name not in expected]
    problems += [f"{name}: engine {reported[name]} != trainer {expected[name]}"
                 for name in reported if name in expected and reported[name] != expected[name]]
    return problems
