"""Disk: the trainer writes the weights as safetensors under ``--weight-sync-dir``, the engines load them.

Each version goes to ``<dir>/v<version>/model.safetensors``, written into a staging directory and renamed into
place (checkpoint/atomic.py), so an engine never reads a half-written file. Engines load it through
``/update_weights_from_disk`` (HTTP) or ``LocalEngine.update_weights(path)`` (in-process), with the tensors'
checksums, checked after reading and before the first copy. Once every engine holds a version, the older
version directories are removed. Sluice engines need only the safetensors; a real SGLang server reloads a full
model directory, which this writer does not produce (no config.json).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors.torch import save_file

from sluice.checkpoint.atomic import move_into_place
from sluice.engine.clients.in_process import InProcessClient
from sluice.sync.engine_calls import HttpClientPerLoop, call_engine, is_sluice_engine
from sluice.sync.interface import (
    Deadline,
    EngineResult,
    NamedWeights,
    SyncReport,
    WeightSync,
    WeightSyncError,
    distinct_weights,
    in_daemon_thread,
    num_bytes,
)
from sluice.sync.stage import run_stage
from sluice.weights.buckets import named_checksums

if TYPE_CHECKING:  # an in-process engine is reached through its own methods; no runtime import of the engine
    from sluice.engine.local_engine import LocalEngine

WEIGHTS_FILE = "model.safetensors"


class DiskSync(WeightSync):
    method = "disk"

    def __init__(self, directory: str | Path, engines: Sequence[str | LocalEngine | InProcessClient], *,
                 timeout_s: float = 300.0, api_key: str | None = None):
        """``engines``: URLs of engine servers and/or in-process engines; all load every version. ``api_key``: the
        servers' admin key; they must list ``directory`` among their weight roots (--sglang-weight-load-dirs)."""
        if not engines:
            raise ValueError("a disk sync needs at least one engine")
        self.directory = Path(directory)
        self.urls = [e.rstrip("/") for e in engines if isinstance(e, str)]
        self.local = [e.engine if isinstance(e, InProcessClient) else e for e in engines if not isinstance(e, str)]
        self.timeout_s = timeout_s
        self.sluice_urls: set[str] | None = None  # servers that take checksums; asked once by connect()
        self.http = HttpClientPerLoop(api_key)

    async def connect(self) -> None:
        if self.sluice_urls is not None:
            return
        deadline = Deadline(self.timeout_s)
        http = self.http.get()
        kinds = await run_stage("join", None, http, {url: is_sluice_engine(http, url, deadline.remaining())
                                                     for url in self.urls}, deadline)
        self.sluice_urls = {url for url, is_sluice in kinds.items() if is_sluice}

    async def push(self, named_weights: NamedWeights, version: int) -> SyncReport:
        started = time.perf_counter()
        await self.connect()
        deadline = Deadline(self.timeout_s)
        weights = distinct_weights(named_weights)
        checksums = await asyncio.to_thread(named_checksums, weights)
        try:
            path = await asyncio.wait_for(asyncio.to_thread(write_version, self.directory, version, weights),
                                          deadline.remaining())
        except (OSError, asyncio.TimeoutError) as error:
            raise WeightSyncError(f"weight sync to version {version} failed at stage 'write': {self.directory}: "
                                  f"{str(error) or 'not written within --update-weights-timeout'}", stage="write") from error
        results = await self._load_everywhere(path, version, checksums, deadline)
        remove_other_versions(self.directory, keep=path)
        return SyncReport(self.method, version, time.perf_counter() - started, num_bytes(weights), 1, results)

    async def close(self) -> None:
        await self.http.aclose()

    async def _load_everywhere(self, path: Path, version: int, checksums: dict[str, int],
                               deadline: Deadline) -> list[EngineResult]:
        calls = {}
        http = self.http.get()
        for url in self.urls:
            body = {"model_path": str(path), "weight_version": str(version)}
            if url in self.sluice_urls:
                body["checksums"] = checksums
            calls[url] = call_engine(http, url, "/update_weights_from_disk", body, deadline.remaining())
        for index, engine in enumerate(self.local):
            calls[f"in-process engine #{index}"] = _load_local(engine, path, version, checksums)
        answers = await run_stage("apply", version, http, calls, deadline)
        return [EngineResult(name, True, str(answer.get("message", ""))) for name, answer in answers.items()]


async def _load_local(engine: LocalEngine, path: Path, version: int, checksums: dict[str, int]) -> dict:
    count = await in_daemon_thread(engine.update_weights, str(path), version, checksums)
    return {"message": f"loaded {count} tensors; weight version {version}"}


def version_dir(directory: Path, version: int) -> Path:
    return directory / f"v{version:08d}"


def write_version(directory: Path, version: int, weights: dict[str, torch.Tensor]) -> Path:
    """Write one version's safetensors atomically; returns its directory."""
    final = version_dir(directory, version)
    staging = directory / f".{final.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # safetensors refuses tensors sharing memory, and writes from host memory: one host copy per tensor.
    host = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in weights.items()}
    save_file(host, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "weight_version": str(version)})
    move_into_place(staging, final)
    return final


_VERSION_DIR = re.compile(r"\.?v\d{8,}(\.staging-.*)?")  # what write_version names (and stages)


def remove_other_versions(directory: Path, keep: Path) -> None:
    """Delete every version directory (and leftover staging directory) except ``keep``."""
    for entry in directory.iterdir():
        if entry != keep and entry.is_dir() and _VERSION_DIR.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
