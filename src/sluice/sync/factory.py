"""``make_weight_sync``: the WeightSync that ``--weight-sync-method`` names, for the engines a run has."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import torch

from sluice.config.sections import SyncConfig
from sluice.engine.clients.in_process import InProcessClient
from sluice.sync.broadcast import BroadcastSync
from sluice.sync.disk import DiskSync
from sluice.sync.in_process import InProcessSync
from sluice.sync.interface import WeightSync
from sluice.sync.ipc import IpcSync

if TYPE_CHECKING:  # an in-process engine is reached through its own methods; no runtime import of the engine
    from sluice.engine.local_engine import LocalEngine

Engine = Union[str, "LocalEngine", InProcessClient]  # an engine server's URL, or an engine in this process


def make_weight_sync(config: SyncConfig, engines: Sequence[Engine], *, device: str | torch.device = "cpu",
                     run_dir: str | Path | None = None, colocated: bool = False,
                     api_key: str | None = None) -> WeightSync:
    """``device``: where the trainer's full tensors live (broadcast picks NCCL for CUDA, gloo otherwise; ipc needs
    CUDA); ``run_dir``: for the disk method's default directory; ``colocated``: the engine servers share the
    trainer's GPUs (--colocate); ``api_key``: the key the engine servers' weight routes need. ``auto`` is
    in_process when every engine lives in this process, ipc for one engine server on the trainer's GPU, broadcast
    for other servers."""
    urls = [engine for engine in engines if isinstance(engine, str)]
    local = [engine for engine in engines if not isinstance(engine, str)]
    method = config.weight_sync_method
    on_gpu = torch.device(device).type == "cuda"
    if colocated and on_gpu and urls and method in ("auto", "broadcast"):
        if len(urls) > 1:  # NCCL refuses two ranks on one GPU, and ipc reaches the trainer's own GPU only
            raise ValueError(f"{len(urls)} engines colocated with the trainer on GPUs: weights reach them only "
                             "through --weight-sync-method disk for now (broadcast would put two NCCL ranks on "
                             "one GPU; ipc reaches the engine on rank 0's GPU only)")
        if method == "broadcast":
            raise ValueError("--weight-sync-method broadcast cannot reach an engine on the trainer's own GPU (NCCL "
                             "refuses two ranks on one device): use ipc (the default there) or disk")
        method = "ipc"
    if method == "auto":
        method = "broadcast" if urls else "in_process"
    if method == "in_process":
        if urls:
            raise ValueError(f"--weight-sync-method in_process needs engines in this process; {urls[0]} is a "
                             "server (use broadcast or disk)")
        # the engine copies straight out of the trainer's tensors in this process: names, shapes and the version
        # are checked, checksums would only re-read the same memory (see docs/weight_sync.md)
        return InProcessSync(local, verify=False)
    if method == "broadcast":
        if local:
            raise ValueError("--weight-sync-method broadcast needs engine servers (URLs); an in-process engine "
                             "takes in_process")
        return BroadcastSync(urls, bucket_bytes=config.update_weight_buffer_size,
                             timeout_s=config.update_weights_timeout, device=device, api_key=api_key)
    if method == "ipc":
        if local:
            raise ValueError("--weight-sync-method ipc needs engine servers (URLs) on the trainer's host; an "
                             "in-process engine takes in_process")
        if torch.device(device).type != "cuda":
            raise ValueError(f"--weight-sync-method ipc shares the trainer's GPU memory by CUDA IPC handles; this "
                             f"trainer's weights are on {device} (use broadcast or disk)")
        return IpcSync(urls, bucket_bytes=config.update_weight_buffer_size, timeout_s=config.update_weights_timeout,
                       api_key=api_key)
    if method == "disk":
        directory = weight_sync_dir(config, run_dir)
        if directory is None:
            raise ValueError("--weight-sync-method disk needs --weight-sync-dir (or a run directory)")
        return DiskSync(directory, list(engines), timeout_s=config.update_weights_timeout, api_key=api_key)
    raise ValueError(f"--weight-sync-method {method!r} is not one of auto, in_process, broadcast, ipc, disk")


def weight_sync_dir(config: SyncConfig, run_dir: str | Path | None) -> Path | None:
    """Where the disk method writes each version: --weight-sync-dir, else ``run_dir``/weight_sync."""
    if config.weight_sync_dir:
        return Path(config.weight_sync_dir)
    return Path(run_dir) / "weight_sync" if run_dir is not None else None
