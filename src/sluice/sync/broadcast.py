"""Broadcast: the trainer's rank-0 process hosts a weight group with every engine process (ranks 1..E) and
broadcasts its full tensors bucket by bucket; NCCL from a GPU trainer, gloo otherwise.

    connect:  POST /init_weights_update_group to every engine   |  trainer hosts the TCPStore and joins as rank 0
    push, per bucket (at most --update-weight-buffer-size bytes):
              POST /update_weights_from_distributed to every    |  trainer broadcasts the bucket (daemon thread)
              engine; each joins the collective, checks, answers|
    a bucket ends when every engine has answered; the last one's answers mean "applied".

Two wire forms. To sluice engines: ``load_format: "flattened_bucket"`` (the bucket's bytes in one buffer, one
collective), per-tensor checksums, and ``bucket_index``/``num_buckets``, so the engine holds the buckets back and
applies the version at its last bucket, atomically between two engine steps. To other servers (a real SGLang):
SGLang's form, one broadcast per tensor, each call applied as it arrives, the version stamped by the last call.
``wire_form="auto"`` asks each engine's /get_server_info which it is.

Every wait is bounded by ``timeout_s`` (``--update-weights-timeout``): the group's own collective timeout, and
the push's deadline around every HTTP call. After a failed push the group is left (its collectives may be out of
step); the next push builds a new one under a new name and port.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from datetime import timedelta
from urllib.parse import urlparse

import httpx
import torch

from sluice.net.auth import is_loopback
from sluice.sync.buckets import Bucket, plan_buckets
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
from sluice.weights.buckets import FLATTENED_BUCKET, tensor_checksums
from sluice.weights.process_group import WeightGroup, join_weight_group, local_address_towards, send_weights

WIRE_FORMS = ("auto", "flattened", "per_tensor")
LEAVE_TIMEOUT_S = 1.0  # for the best-effort /destroy_weights_update_group calls after a failure


class BroadcastSync(WeightSync):
    method = "broadcast"

    def __init__(self, engine_urls: list[str], *, bucket_bytes: int = 512 * 2**20, timeout_s: float = 300.0,
                 backend: str = "auto", device: str | torch.device = "cpu", master_address: str | None = None,
                 wire_form: str = "auto", api_key: str | None = None):
        """``device``: where the trainer's full tensors live; ``backend`` auto: nccl for a CUDA device, else gloo.
        ``master_address``: the address engines reach the trainer at (default: loopback when every engine is
        local, else this host's address on the route to the first engine). ``api_key``: the engines' admin key."""
        if not engine_urls:
            raise ValueError("a broadcast sync needs at least one engine URL")
        if wire_form not in WIRE_FORMS:
            raise ValueError(f"wire_form must be one of {WIRE_FORMS}, got {wire_form!r}")
        self.engine_urls = [url.rstrip("/") for url in engine_urls]
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self.backend = backend if backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        self.master_address = master_address or _master_address(self.engine_urls)
        self.wire_form = wire_form
        self.flattened = wire_form == "flattened"  # decided by connect() for "auto"
        self.group: WeightGroup | None = None
        self.http = HttpClientPerLoop(api_key)
        # The trainer's flattened-bucket buffer, kept across buckets and pushes (on the group's device): on a CPU
        # a fresh 512 MiB buffer per bucket costs more in page faults than the copy into it.
        self.send_buffer: torch.Tensor | None = None

    # ---- group ----------------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self.group is not None:
            return
        deadline = Deadline(self.timeout_s)
        http = self.http.get()
        if self.wire_form == "auto":
            kinds = await run_stage("join", None, http, {url: is_sluice_engine(http, url, deadline.remaining())
                                                         for url in self.engine_urls}, deadline)
            self.flattened = all(kinds.values())
        name = f"sluice_weights_{uuid.uuid4().hex[:12]}"
        port = free_port(self.master_address)
        world_size = len(self.engine_urls) + 1
        trainer = in_daemon_thread(join_weight_group, self.master_address, port, 0, world_size, name,
                                   self.backend, self.device, timedelta(seconds=deadline.remaining()))
        calls = {url: call_engine(http, url, "/init_weights_update_group",
                                  self._init_body(name, port, rank, world_size, deadline), deadline.remaining())
                 for rank, url in enumerate(self.engine_urls, start=1)}
        try:
            await run_stage("join", None, http, calls, deadline, trainer_part=trainer)
        except WeightSyncError as error:
            await self._leave(name, skip=error.unresponsive)
            raise
        self.group = trainer.result()

    def _init_body(self, name: str, port: int, rank: int, world_size: int, deadline: Deadline) -> dict:
        body = {"master_address": self.master_address, "master_port": port, "rank_offset": rank,
                "world_size": world_size, "group_name": name, "backend": self.backend}
        if self.flattened:  # sluice engines: their side of the group times out with ours
            body["timeout_s"] = max(deadline.remaining(), 1.0)
        return body

    async def close(self) -> None:
        self.send_buffer = None
        if self.group is not None:
            group, self.group = self.group, None
            await self._leave(group.name)
            _shut_down(group)
        await self.http.aclose()

    async def _leave(self, name: str, skip: list[str] = ()) -> None:
        """Best effort: engines forget the group (and any half-staged version); failures are ignored, and
        engines known to be unresponsive (``skip``) are not asked."""
        http = self.http.get()
        calls = [call_engine(http, url, "/destroy_weights_update_group", {"group_name": name}, LEAVE_TIMEOUT_S)
                 for url in self.engine_urls if url not in skip]
        await asyncio.gather(*calls, return_exceptions=True)

    # ---- push -----------------------------------------------------------------------------------------
    async def push(self, named_weights: NamedWeights, version: int) -> SyncReport:
        started = time.perf_counter()
        await self.connect()
        weights = distinct_weights(named_weights)
        buckets = plan_buckets(weights, self.bucket_bytes)
        deadline = Deadline(self.timeout_s)
        if self.flattened:
            self._reserve_send_buffer(max(bucket.flat_bytes for bucket in buckets))
        answers: dict = {}
        http = self.http.get()
        try:
            for index, bucket in enumerate(buckets):
                answers = await self._push_bucket(http, bucket, index, len(buckets), version, deadline)
        except WeightSyncError as error:
            group, self.group = self.group, None
            self.send_buffer = None  # a stuck collective of the old group may still be reading it
            await self._leave(group.name, skip=error.unresponsive)
            _shut_down(group, failed=True)
            raise
        engines = [EngineResult(url, True, str(answers[url].get("message", ""))) for url in self.engine_urls]
        return SyncReport(self.method, version, time.perf_counter() - started, num_bytes(weights), len(buckets),
                          engines)

    async def _push_bucket(self, http: httpx.AsyncClient, bucket: Bucket, index: int, num_buckets: int,
                           version: int, deadline: Deadline) -> dict:
        body = {"names": bucket.names, "dtypes": [str(d).removeprefix("torch.") for d in bucket.dtypes],
                "shapes": bucket.shapes, "group_name": self.group.name}
        is_last = index == num_buckets - 1
        if self.flattened:
            checksums = await asyncio.to_thread(tensor_checksums, bucket.tensors)
            body.update(load_format=FLATTENED_BUCKET, checksums=checksums, bucket_index=index,
                        num_buckets=num_buckets, weight_version=str(version))
            trainer = in_daemon_thread(self._send_flattened, self.group, bucket, self.send_buffer)
        else:  # SGLang applies each call at once: stamp the version and flush the cache with the last one only
            body["flush_cache"] = is_last
            if is_last:
                body["weight_version"] = str(version)
            trainer = in_daemon_thread(self._send_per_tensor, self.group, bucket)
        calls = {url: call_engine(http, url, "/update_weights_from_distributed", body, deadline.remaining())
                 for url in self.engine_urls}
        return await run_stage("broadcast", version, http, calls, deadline, trainer_part=trainer,
                               stage_after_trainer="apply" if is_last else "broadcast", refusal_stage="apply")

    def _reserve_send_buffer(self, num_bytes: int) -> None:
        buffer = self.send_buffer
        if buffer is None or buffer.numel() < num_bytes:
            self.send_buffer = None  # free the old one first
            self.send_buffer = torch.empty(num_bytes, dtype=torch.uint8, device=self.group.device)

    @staticmethod
    def _send_flattened(group: WeightGroup, bucket: Bucket, buffer: torch.Tensor) -> None:
        group.broadcast(bucket.flatten(group.device, out=buffer))
        _wait_for_device(group)

    @staticmethod
    def _send_per_tensor(group: WeightGroup, bucket: Bucket) -> None:
        send_weights(group, dict(zip(bucket.names, bucket.tensors)))
        _wait_for_device(group)


def _wait_for_device(group: WeightGroup) -> None:
    """NCCL's wait() only orders the current stream after the collective; block until it has really finished,
    so a stuck broadcast shows up here, and "sent" means sent."""
    if group.backend == "nccl":
        torch.cuda.current_stream(group.device).synchronize()


def _shut_down(group: WeightGroup | None, failed: bool = False) -> None:
    """Free an NCCL communicator now (a gloo group just goes with its last reference). After a failure it is
    aborted: a broadcast stuck on a dead peer otherwise blocks the trainer's stream, which waits on it, for good
    (or until NCCL's watchdog tears the process down at the group's timeout)."""
    if group is None or group.backend != "nccl":
        return
    try:
        group.process_group.abort() if failed else group.process_group.shutdown()
    except Exception:  # noqa: BLE001 - already broken or aborted: nothing left to free
        pass


def _master_address(urls: list[str]) -> str:
    hosts = [urlparse(url).hostname or "127.0.0.1" for url in urls]
    if all(is_loopback(host) for host in hosts):
        return "127.0.0.1"
    return local_address_towards(hosts[0], urlparse(urls[0]).port or 80)


def free_port(address: str) -> int:
    """A port free on ``address`` now, for the group's TCPStore (another process could take it first; rare)."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]
