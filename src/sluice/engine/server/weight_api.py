"""Weight routes: SGLang's updates from disk, by broadcast and by CUDA IPC handles, plus sluice's checksum route
and bucket extensions.

Every call that waits (joining a group, receiving a broadcast, copying weights, checksums) runs in a worker thread,
so the event loop keeps answering /health and streaming. ``ctx.weights_lock`` serializes them: two updates through
one group must not interleave their collectives.

A broadcast request for a known group always takes part in the broadcast before any check that could refuse it
(version, checksums): a rank that skipped the collective would leave the trainer blocked until its timeout.

Only directories under the server's weight roots (the model's parent, --sglang-weight-load-dirs) load from disk:
any other path is refused with 403 naming the roots, before requests are aborted or a file is read.

An IPC update maps the trainer's GPU memory (weights/ipc.py). The trainer refills or frees that memory once
it has our answer, so every copy out of it has finished before we answer: a bucket held back is copied into
memory of our own, and the device is synchronized after the copies.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import torch

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sluice.device import resolve_device
from sluice.engine.server.context import ServerContext
from sluice.engine.server.native_schema import (
    DestroyGroupBody,
    DiskUpdateBody,
    DistributedUpdateBody,
    InitGroupBody,
    TensorUpdateBody,
)
from sluice.engine.server.weight_staging import stage_bucket
from sluice.net.http_errors import RequestError, read_body
from sluice.weights.buckets import (
    FLATTENED_BUCKET,
    bucket_layout,
    checksum_mismatches,
    unflatten_bucket,
    weights_digest,
)
from sluice.weights.ipc import ForbiddenGlobal, decode_payload, flat_buffer, named_tensors
from sluice.weights.process_group import join_weight_group, parse_dtype, receive_bucket, receive_weights

GROUP_JOIN_TIMEOUT = timedelta(minutes=5)  # when the trainer gives none (SGLang's request has no such field)
IPC_STAGING = "update_weights_from_tensor"  # staged_updates' key for versions arriving by IPC (there is no group)


def weight_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        body = await read_body(request, DiskUpdateBody)
        version = _weight_version(body.weight_version, ctx.engine.weight_version)
        ctx.check_weight_path("model_path", body.model_path)  # before anything is aborted or read
        if body.abort_all_requests:
            ctx.engine.abort(None)
        async with ctx.weights_lock:
            return await _apply_weights(ctx, body.model_path, version, body.checksums)

    @router.post("/init_weights_update_group")
    async def init_group(request: Request):
        body = await read_body(request, InitGroupBody)
        if body.rank_offset >= body.world_size:
            raise RequestError("rank_offset", f"{body.rank_offset} is outside a group of {body.world_size}")
        if body.group_name in ctx.weight_groups:
            raise RequestError("group_name", f"group {body.group_name!r} already exists; destroy it first")
        device = resolve_device(ctx.engine_config.device)
        timeout = timedelta(seconds=body.timeout_s) if body.timeout_s else GROUP_JOIN_TIMEOUT
        async with ctx.weights_lock:
            try:
                group = await asyncio.to_thread(
                    join_weight_group, body.master_address, body.master_port, body.rank_offset, body.world_size,
                    body.group_name, body.backend, device, timeout)
            except Exception as error:  # noqa: BLE001 - reported to the trainer, the server stays up
                return _failure(f"joining group {body.group_name!r} failed: {error}")
        ctx.weight_groups[body.group_name] = group
        return {"success": True, "message": f"joined {body.group_name!r} as rank {body.rank_offset}"}

    @router.post("/update_weights_from_distributed")
    async def update_from_distributed(request: Request):
        body = await read_body(request, DistributedUpdateBody)
        group = ctx.weight_groups.get(body.group_name)
        if group is None:
            raise RequestError("group_name", f"no weight update group {body.group_name!r}; call "
                                             "/init_weights_update_group first")
        dtypes = [_dtype(i, name) for i, name in enumerate(body.dtypes)]
        version = _weight_version(body.weight_version, ctx.engine.weight_version)
        if body.abort_all_requests:
            ctx.engine.abort(None)
        async with ctx.weights_lock:
            try:
                if body.load_format == FLATTENED_BUCKET:
                    slots, total = bucket_layout(body.names, dtypes, body.shapes)
                    tensors = await asyncio.to_thread(receive_bucket, group, slots, total)
                else:
                    tensors = await asyncio.to_thread(receive_weights, group, body.names, dtypes, body.shapes)
            except Exception as error:  # noqa: BLE001 - a broken group; the trainer must build a new one
                ctx.staged_updates.pop(body.group_name, None)
                return _failure(f"receiving broadcast weights failed: {error}")
            expected = dict(zip(body.names, body.checksums)) if body.checksums is not None else None
            return await _take_bucket(ctx, body.group_name, body, tensors, expected, version)

    @router.post("/update_weights_from_tensor")
    async def update_from_tensor(request: Request):
        """SGLang's update by CUDA IPC handles: the trainer's GPU memory, mapped here, is copied into the weights.

        Security: the payload is a pickle, read only through weights/ipc.py's restricted unpickler (torch's
        CUDA tensor rebuild and the few classes it names; any other class is refused with a 400 naming it). A
        caller can still make this process map GPU memory that other processes of the user shared, so this route
        needs the admin key (or the API key when there is no admin key), and a server without keys listens on
        loopback only.
        """
        body = await read_body(request, TensorUpdateBody)
        dtypes = [_dtype(i, name) for i, name in enumerate(body.dtypes or [])]
        version = _weight_version(body.weight_version, ctx.engine.weight_version)
        if body.abort_all_requests:
            ctx.engine.abort(None)
        device = resolve_device(ctx.engine_config.device)
        async with ctx.weights_lock:
            try:
                if body.load_format == FLATTENED_BUCKET:
                    tensors = await asyncio.to_thread(_map_bucket, body, dtypes, device)
                else:
                    tensors = await asyncio.to_thread(_map_named, body)
            except ForbiddenGlobal as error:
                ctx.staged_updates.pop(IPC_STAGING, None)
                raise RequestError("serialized_named_tensors[0]", str(error)) from None
            except Exception as error:  # noqa: BLE001 - malformed, or CUDA could not map it: the server stays up
                ctx.staged_updates.pop(IPC_STAGING, None)
                return _failure(f"reading the shared CUDA tensors failed: {error}")
            try:
                names = body.names if body.names is not None else list(tensors)
                expected = dict(zip(names, body.checksums)) if body.checksums is not None else None
                return await _take_bucket(ctx, IPC_STAGING, body, tensors, expected, version)
            finally:
                await asyncio.to_thread(_finish_copies, tensors, device)

    @router.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        body = await read_body(request, DestroyGroupBody, optional=True)
        ctx.staged_updates.pop(body.group_name, None)
        if ctx.weight_groups.pop(body.group_name, None) is None:
            raise RequestError("group_name", f"no weight update group {body.group_name!r}")
        return {"success": True, "message": f"left {body.group_name!r}"}

    @router.get("/get_weights_checksum")
    async def weights_checksum():
        """sluice extension: the current weights' checksums by HF name, and one digest of them all."""
        version, checksums = await asyncio.to_thread(ctx.engine.weight_checksums)
        return {"weight_version": str(version), "digest": weights_digest(checksums), "checksums": checksums}

    return router


async def _take_bucket(ctx: ServerContext, key: str, body: DistributedUpdateBody | TensorUpdateBody, tensors: dict,
                       expected: dict[str, int] | None, version: int):
    """Check a received bucket against ``expected`` checksums; apply it (SGLang's form, or the last bucket of a
    version) or hold it back under ``key`` (the group, or IPC_STAGING)."""
    where = f"bucket {body.bucket_index} of {body.num_buckets}" if body.is_bucketed else "update"
    try:
        if body.is_bucketed and body.bucket_index == 0 and version < ctx.engine.weight_version:
            raise ValueError(f"weight version {version} is older than the engine's {ctx.engine.weight_version}")
        if expected is not None:
            problems = await asyncio.to_thread(checksum_mismatches, tensors, expected)
            if problems:
                raise ValueError(f"{where} of weight version {version} refused, its checksums do not match: "
                                 + "; ".join(problems[:5]))
        if body.is_bucketed:
            staged = stage_bucket(ctx.staged_updates, key, body.bucket_index, body.num_buckets, version, tensors)
    except ValueError as error:
        ctx.staged_updates.pop(key, None)
        return _failure(str(error))
    if not body.is_bucketed:
        return await _apply_weights(ctx, tensors, version)
    if not staged.complete:
        return {"success": True, "message": f"staged {where} of weight version {version}"}
    del ctx.staged_updates[key]
    return await _apply_weights(ctx, staged.tensors, version)


async def _apply_weights(ctx: ServerContext, weights, version: int, checksums: dict | None = None):
    try:
        count = await asyncio.to_thread(ctx.engine.update_weights, weights, version, checksums)
    except (ValueError, KeyError, OSError, TypeError) as error:  # bad path, names, shapes, checksums or version
        return _failure(f"weight update failed: {error}")
    return {"success": True, "message": f"loaded {count} tensors; weight version {version}",
            "num_paused_requests": 0}


def _map_bucket(body: TensorUpdateBody, dtypes: list, device: torch.device) -> dict[str, torch.Tensor]:
    """The flattened form: views of the trainer's shared buffer, or of our own copy of it when the bucket is held
    back (the trainer refills its buffer with the next bucket once we answer)."""
    slots, total = bucket_layout(body.names, dtypes, body.shapes)
    buffer = flat_buffer(decode_payload(body.serialized_named_tensors[0]), total)
    if not body.is_last_bucket:
        buffer = buffer.to(device, copy=True)
    return unflatten_bucket(buffer, slots)


def _map_named(body: TensorUpdateBody) -> dict[str, torch.Tensor]:
    """SGLang's form: the trainer's tensors themselves, mapped; applied at once."""
    tensors = named_tensors(decode_payload(body.serialized_named_tensors[0]))
    if body.checksums is not None and len(body.checksums) != len(tensors):
        raise ValueError(f"checksums: {len(body.checksums)} checksums for {len(tensors)} tensors")
    return tensors


def _finish_copies(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Wait until every copy out of the trainer's memory (and into ours) has finished on the GPU."""
    devices = {tensor.device for tensor in tensors.values()} | {device}
    for cuda_device in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(cuda_device)


def _failure(message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=400)


def _weight_version(value: str | int | None, current: int) -> int:
    """SGLang versions are strings; ours are integers, so a given version must read as one."""
    if value is None:
        return current
    try:
        return int(value)
    except ValueError:
        raise RequestError("weight_version", f"{value!r} is not an integer; sluice numbers weight versions") from None


def _dtype(index: int, name: str):
    try:
        return parse_dtype(name)
    except ValueError as error:
        raise RequestError(f"dtypes[{index}]", str(error)) from None
