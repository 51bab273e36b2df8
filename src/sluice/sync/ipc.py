"""CUDA IPC: engine processes on the trainer's host map the trainer's GPU memory and copy the weights out of it,
device to device, through SGLang's ``/update_weights_from_tensor``.

    connect:  GET /get_server_info from every engine (sluice engines take the flattened form)
    push, per bucket (at most --update-weight-buffer-size bytes):
      trainer  flattens the bucket into its one GPU buffer (reused across buckets and pushes), checksums it,
               waits for the device, takes the buffer's IPC handle (daemon thread)
      POST /update_weights_from_tensor to every engine: the handle, names/dtypes/shapes, checksums,
               bucket_index/num_buckets; each maps the buffer, checks, keeps a copy of a held-back bucket or
               applies the version at its last one, waits for its device, answers
    the buffer is refilled only after every engine answered; the last bucket's answers mean "applied".

Why: NCCL puts one rank per GPU, so a trainer and an engine process on one GPU cannot broadcast through NCCL,
and gloo goes through host memory twice. Sharing the memory needs no collective and no host copy, but only works
between processes of one host (the handles mean nothing elsewhere), from a trainer whose weights are on a GPU.

To other servers (a real SGLang), SGLang's own form: per bucket a list of (name, tensor) pairs pickled with
torch's reductions (one handle per tensor of the trainer's own weights), each call applied as it arrives, the last
one stamping the version. ``wire_form="auto"`` asks each engine's /get_server_info which it is.

Every wait is bounded by ``timeout_s`` (``--update-weights-timeout``). After a failed push the buffer is dropped:
an engine that gave up late may still map it, and torch's IPC ref count keeps that memory out of the trainer's
allocator until the engine lets go.
"""

from __future__ import annotations

import asyncio
import base64
import time
from multiprocessing.reduction import ForkingPickler

import httpx
import torch
import torch.multiprocessing  # noqa: F401 - registers torch's tensor reducers with ForkingPickler

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
from sluice.sync.stage import TIMEOUT_FLAG, run_stage
from sluice.weights.buckets import FLATTENED_BUCKET, tensor_checksums
from sluice.weights.ipc import encode_payload, share_cuda_tensor

WIRE_FORMS = ("auto", "flattened", "per_tensor")
ROUTE = "/update_weights_from_tensor"


class IpcSync(WeightSync):
    method = "ipc"

    def __init__(self, engine_urls: list[str], *, bucket_bytes: int = 512 * 2**20, timeout_s: float = 300.0,
                 verify: bool = True, wire_form: str = "auto", api_key: str | None = None):
        """``verify``: send per-tensor checksums for sluice engines to check (one extra read of the weights on
        each side); ``wire_form``: auto asks each engine whether it takes sluice's flattened form; ``api_key``: the
        engines' admin key."""
        if not engine_urls:
            raise ValueError("an IPC sync needs at least one engine URL")
        if wire_form not in WIRE_FORMS:
            raise ValueError(f"wire_form must be one of {WIRE_FORMS}, got {wire_form!r}")
        self.engine_urls = [url.rstrip("/") for url in engine_urls]
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.verify = verify
        self.wire_form = wire_form
        self.flattened = wire_form == "flattened"  # decided by connect() for "auto"
        self.connected = False
        self.http = HttpClientPerLoop(api_key)
        # The flattened buckets' buffer on the trainer's GPU, shared by IPC handle; refilled only once every engine
        # answered for the bucket it holds.
        self.send_buffer: torch.Tensor | None = None

    async def connect(self) -> None:
        if self.connected:
            return
        if self.wire_form == "auto":
            deadline = Deadline(self.timeout_s)
            http = self.http.get()
            kinds = await run_stage("join", None, http, {url: is_sluice_engine(http, url, deadline.remaining())
                                                         for url in self.engine_urls}, deadline)
            self.flattened = all(kinds.values())
        self.connected = True

    async def close(self) -> None:
        self.send_buffer = None
        await self.http.aclose()

    async def push(self, named_weights: NamedWeights, version: int) -> SyncReport:
        started = time.perf_counter()
        weights = distinct_weights(named_weights)
        _require_cuda(weights, version)
        await self.connect()
        buckets = plan_buckets(weights, self.bucket_bytes)
        deadline = Deadline(self.timeout_s)
        if self.flattened:
            device = next(iter(weights.values())).device
            self._reserve_send_buffer(max(bucket.flat_bytes for bucket in buckets), device)
        http = self.http.get()
        answers: dict = {}
        try:
            for index, bucket in enumerate(buckets):
                answers = await self._push_bucket(http, bucket, index, len(buckets), version, deadline)
        except WeightSyncError:
            self.send_buffer = None  # an engine may still map it (see the module docstring)
            raise
        engines = [EngineResult(url, True, str(answers[url].get("message", ""))) for url in self.engine_urls]
        return SyncReport(self.method, version, time.perf_counter() - started, num_bytes(weights), len(buckets),
                          engines)

    async def _push_bucket(self, http: httpx.AsyncClient, bucket: Bucket, index: int, num_buckets: int,
                           version: int, deadline: Deadline) -> dict:
        is_last = index == num_buckets - 1
        if self.flattened:
            payload, checksums = await _trainer_part(version, index, deadline, _share_flattened, bucket,
                                                     self.send_buffer, self.verify)
            body = {"serialized_named_tensors": [payload], "load_format": FLATTENED_BUCKET, "names": bucket.names,
                    "dtypes": [str(d).removeprefix("torch.") for d in bucket.dtypes], "shapes": bucket.shapes,
                    "bucket_index": index, "num_buckets": num_buckets, "weight_version": str(version)}
            if checksums is not None:
                body["checksums"] = checksums
        else:  # SGLang applies each call at once: stamp the version and flush the cache with the last one only
            payload, _ = await _trainer_part(version, index, deadline, _share_per_tensor, bucket)
            body = {"serialized_named_tensors": [payload], "flush_cache": is_last}
            if is_last:
                body["weight_version"] = str(version)
        calls = {url: call_engine(http, url, ROUTE, body, deadline.remaining()) for url in self.engine_urls}
        return await run_stage("apply" if is_last else "share", version, http, calls, deadline,
                               refusal_stage="apply")

    def _reserve_send_buffer(self, num_bytes: int, device: torch.device) -> None:
        buffer = self.send_buffer
        if buffer is None or buffer.device != device or buffer.numel() < num_bytes:
            self.send_buffer = None  # free the old one first
            self.send_buffer = torch.empty(num_bytes, dtype=torch.uint8, device=device)


async def _trainer_part(version: int, index: int, deadline: Deadline, share, *args):
    """The trainer's side of a bucket, in a daemon thread (GPU work: it hangs if the device does), bounded by the
    push's deadline."""
    future = in_daemon_thread(share, *args)
    done, _ = await asyncio.wait([future], timeout=deadline.remaining())
    if not done:
        raise WeightSyncError(
            f"weight sync to version {version} failed at stage 'share': the trainer did not flatten and share bucket "
            f"{index} within {deadline.seconds:g} s ({TIMEOUT_FLAG} is {deadline.seconds:g} s; raise it if the "
            "device is only slow)", stage="share")
    if future.exception() is not None:
        raise WeightSyncError(f"weight sync to version {version} failed at stage 'share': the trainer could not "
                              f"share bucket {index}: {future.exception()}", stage="share") from future.exception()
    return future.result()


def _share_flattened(bucket: Bucket, buffer: torch.Tensor, verify: bool) -> tuple[str, list[int] | None]:
    """Our form: the bucket flattened into ``buffer``, one handle for all of it, and the tensors' checksums."""
    checksums = tensor_checksums(bucket.tensors) if verify else None
    flat = bucket.flatten(buffer.device, out=buffer)
    torch.cuda.current_stream(flat.device).synchronize()  # the engine reads the buffer on its own stream
    return encode_payload(share_cuda_tensor(flat)), checksums


def _share_per_tensor(bucket: Bucket) -> tuple[str, None]:
    """SGLang's form, as its MultiprocessingSerializer writes it: the trainer's tensors themselves."""
    for device in {tensor.device for tensor in bucket.tensors}:
        torch.cuda.current_stream(device).synchronize()  # the optimizer's last writes have landed
    pairs = list(zip(bucket.names, bucket.tensors))
    return base64.b64encode(bytes(ForkingPickler.dumps(pairs))).decode("ascii"), None


def _require_cuda(weights: dict[str, torch.Tensor], version: int) -> None:
    for name, tensor in weights.items():
        if tensor.device.type != "cuda":
            raise WeightSyncError(
                f"weight sync to version {version} failed at stage 'share': tensor {name!r} is on {tensor.device}; "
                "--weight-sync-method ipc shares the trainer's GPU memory by CUDA IPC handles, so every weight must "
                "be on a CUDA device (use broadcast or disk)", stage="share")
