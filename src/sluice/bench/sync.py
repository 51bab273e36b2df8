"""`sluice bench sync`: weight-sync latency trainer -> engine for a model shape, by each method.

Workload: random weights of a named shape (default the Qwen2.5-0.5B shape; ``demo`` is the demo model), bf16 on
GPU and float32 on CPU, pushed as new versions to

- ``colocated``: an engine in this process on the trainer's device (InProcessSync: a device-to-device copy);
- ``separate_process``: a `sluice serve` subprocess on 127.0.0.1. ``--backend auto``: a CUDA trainer broadcasts
  through NCCL when the engine process can have a GPU of its own (cuda:1; NCCL puts one rank per GPU); on a
  machine with one GPU the engine shares the trainer's GPU and maps its buffers by CUDA IPC handles (IpcSync,
  ``"wire": "cuda_ipc"``), and the gloo broadcast it replaces (a round trip through host memory on both sides)
  is reported next to it as ``separate_process_broadcast``; a CPU trainer broadcasts through gloo;
- ``disk``: the same server, through safetensors under a temporary directory (DiskSync).

One warm-up push, then the median of ``--repeats`` pushes; each push is timed from the call to the engines'
answer (on GPU after a device synchronize), checksums included. After the last push the engine's weights are
compared with the trainer's by checksum ("verified"). The goals printed next to the figures are for a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from sluice.bench.run_info import device_name, git_commit
from sluice.bench.shapes import SHAPES, write_random_checkpoint
from sluice.config import EngineConfig
from sluice.engine.local_engine import LocalEngine
from sluice.sync.broadcast import BroadcastSync
from sluice.sync.disk import DiskSync
from sluice.sync.in_process import InProcessSync
from sluice.sync.ipc import IpcSync
from sluice.sync.verify import checksum_differences, engine_checksums, expected_checksums
from sluice.weights.safetensors_files import iter_safetensors

GOALS_MS = {"colocated": 20.0, "separate_process": 100.0}  # on a GPU, for the Qwen2.5-0.5B shape
KV_TOKENS = 4096  # the engines' KV pool: small, the benchmark never generates


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sluice bench sync", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted([*SHAPES, "demo"]))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda: where the trainer's weights live.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed pushes per method (after one warm-up).")
    parser.add_argument("--bucket-bytes", type=int, default=512 * 2**20, help="--update-weight-buffer-size.")
    parser.add_argument("--timeout", type=float, default=600.0, help="--update-weights-timeout, seconds.")
    parser.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo", "ipc"),
                        help="How the separate process gets the weights: a broadcast (nccl, gloo) or CUDA IPC (ipc, "
                             "engine on the trainer's GPU); auto: nccl with two GPUs or more, else ipc on one GPU, "
                             "gloo on a CPU.")
    parser.add_argument("--methods", default="colocated,separate_process,disk",
                        help="Comma-separated subset of colocated, separate_process, disk.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def bench_sync(argv: list[str]) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_checkpoint(args.shape, Path(tmp) / "model", dtype, args.seed)
        weights = _trainer_weights(path, device, dtype, args.seed + 1)
        num_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        report = {"bench": "sync", "model_shape": args.shape, "device": device_name(device),
                  "dtype": str(dtype).removeprefix("torch."), "commit": git_commit(), "repeats": args.repeats,
                  "num_params": sum(t.numel() for t in weights.values()), "num_bytes": num_bytes,
                  "bucket_bytes": args.bucket_bytes, "goals_ms_gpu": GOALS_MS}
        if "colocated" in methods:
            # as runs use it (names, shapes and version checked; no checksums: no byte leaves the process), and
            # with the checksums of the cross-process methods, for comparison
            report["colocated"] = _colocated(path, weights, device, dtype, args.repeats, verify=False)
            report["colocated_checksummed"] = _colocated(path, weights, device, dtype, args.repeats, verify=True)
        if "separate_process" in methods or "disk" in methods:
            report.update(_to_server(path, weights, device, dtype, args, methods, Path(tmp) / "weight_sync"))
    return report


def _write_checkpoint(shape: str, out: Path, dtype: torch.dtype, seed: int) -> Path:
    if shape == "demo":
        from sluice.demo.model import build_checkpoint

        return build_checkpoint(out, seed=seed)
    return write_random_checkpoint(shape, out, dtype, "cpu", seed)


def _trainer_weights(path: Path, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """New random weights of the checkpoint's names and shapes, on the trainer's device."""
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(tensor.shape, generator=generator) * 0.02).to(device=device, dtype=dtype)
            for name, tensor in iter_safetensors(path)}


def _colocated(path: Path, weights: dict, device: torch.device, dtype: torch.dtype, repeats: int,
               verify: bool) -> dict:
    engine = LocalEngine(str(path), _engine_config(str(device), dtype))
    try:
        sync = InProcessSync([engine], verify=verify)
        seconds, report = _timed_pushes(sync, weights, repeats, device)
        version, held = engine.weight_checksums()
        verified = version == report.version and not checksum_differences(expected_checksums(weights), held)
    finally:
        engine.shutdown()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _figures(seconds, report, verified, goal_ms=GOALS_MS["colocated"])


def _to_server(path: Path, weights: dict, device: torch.device, dtype: torch.dtype, args, methods: list[str],
               sync_dir: Path) -> dict:
    wire, engine_device = _placement(device, args.backend)
    runs = []  # (figure name, how the weights travel, goal)
    if "separate_process" in methods:
        runs.append(("separate_process", wire, GOALS_MS["separate_process"]))
        if wire == "cuda_ipc":  # the gloo broadcast that IPC replaces on one GPU, for comparison
            runs.append(("separate_process_broadcast", "gloo", None))
    if "disk" in methods:
        runs.append(("disk", "disk", None))
    process, url = start_serve_process(path, engine_device, dtype)
    figures: dict = {}
    try:
        for index, (name, how, goal_ms) in enumerate(runs):
            sync = DiskSync(sync_dir, [url], timeout_s=args.timeout) if how == "disk" else \
                _separate_process_sync(how, url, device, args)
            # versions go on from where the previous method left the engine (one warm-up + repeats each)
            figures[name] = _measure_server(sync, url, weights, args.repeats, device, goal_ms, engine_device,
                                            1 + index * (args.repeats + 1))
            if how != "disk":
                figures[name]["wire"] = how
    finally:
        process.terminate()
        process.wait(timeout=60)
    return figures


def _separate_process_sync(wire: str, url: str, device: torch.device, args):
    if wire == "cuda_ipc":
        return IpcSync([url], bucket_bytes=args.bucket_bytes, timeout_s=args.timeout)
    return BroadcastSync([url], bucket_bytes=args.bucket_bytes, timeout_s=args.timeout, device=device, backend=wire)


def _placement(device: torch.device, backend: str) -> tuple[str, str]:
    """How the separate process gets the weights (nccl, gloo, cuda_ipc) and its device. NCCL cannot put two
    ranks on one GPU, so with NCCL a CUDA trainer's engine takes the next GPU; with one GPU, the engine shares the
    trainer's and maps its buffers by CUDA IPC."""
    if device.type != "cuda":
        if backend in ("nccl", "ipc"):
            raise ValueError(f"--backend {backend} needs a CUDA trainer (--device cuda)")
        return "gloo", "cpu"
    next_gpu = (device.index or 0) + 1
    if backend == "auto":
        backend = "nccl" if torch.cuda.device_count() > next_gpu else "ipc"
    if backend == "nccl":
        return "nccl", f"cuda:{next_gpu}"
    return ("cuda_ipc" if backend == "ipc" else "gloo"), str(device)


def _measure_server(sync, url: str, weights: dict, repeats: int, device: torch.device, goal_ms: float | None,
                    engine_device: str, first_version: int) -> dict:
    started = time.perf_counter()
    try:
        asyncio.run(sync.connect())
        connect_s = time.perf_counter() - started
        seconds, report = _timed_pushes(sync, weights, repeats, device, first_version)
        version, held = asyncio.run(engine_checksums(url))
    except Exception as error:  # noqa: BLE001 - reported in the JSON; the other methods still run
        return {"error": f"{type(error).__name__}: {error}", "engine_device": engine_device}
    finally:
        asyncio.run(sync.close())
    verified = version == report.version and not checksum_differences(expected_checksums(weights), held)
    figures = _figures(seconds, report, verified, goal_ms)
    figures.update(connect_ms=round(1e3 * connect_s, 1), engine_device=engine_device)
    if isinstance(sync, BroadcastSync):
        figures.update(backend=sync.backend, wire_form="flattened_bucket" if sync.flattened else "per_tensor")
    if isinstance(sync, IpcSync):
        figures.update(wire_form="flattened_bucket" if sync.flattened else "per_tensor")
    return figures


def _timed_pushes(sync, weights: dict, repeats: int, device: torch.device, first_version: int = 1):
    """Seconds of each timed push (after one warm-up push), and the last push's report."""
    async def run():
        seconds, report = [], None
        for count, version in enumerate(range(first_version, first_version + repeats + 1)):
            started = time.perf_counter()
            report = await sync.push(weights, version)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if count:
                seconds.append(time.perf_counter() - started)
        return seconds, report

    return asyncio.run(run())


def _figures(seconds: list[float], report, verified: bool, goal_ms: float | None) -> dict:
    figures = {"median_ms": round(1e3 * statistics.median(seconds), 2),
               "all_ms": [round(1e3 * s, 2) for s in seconds], "num_bytes": report.num_bytes,
               "num_buckets": report.num_buckets, "verified": verified}
    if goal_ms is not None:
        figures["goal_ms_gpu"] = goal_ms
    return figures


def _engine_config(device: str, dtype: torch.dtype) -> EngineConfig:
    return EngineConfig(device=device, dtype=str(dtype).removeprefix("torch."), skip_tokenizer_init=True,
                        max_running_requests=8, max_total_tokens=KV_TOKENS, disable_cuda_graph=True)


def start_serve_process(path: Path, device: str, dtype: torch.dtype, timeout_s: float = 600.0):
    """A `sluice serve` subprocess on a free port of 127.0.0.1; returns it and its URL once it listens."""
    command = [sys.executable, "-m", "sluice.cli", "serve", "--model", str(path), "--port", "0",
               "--sglang-device", device, "--sglang-dtype", str(dtype).removeprefix("torch."),
               "--sglang-skip-tokenizer-init", "--sglang-max-running-requests", "8",
               "--sglang-max-total-tokens", str(KV_TOKENS), "--sglang-disable-cuda-graph"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict = {}
    ready = threading.Event()
    lines: list[str] = []

    def read() -> None:  # keeps draining the pipe after the URL, so the server never blocks on a full pipe
        for line in process.stdout:
            lines.append(line)
            if line.startswith("sluice serve:") and "url" not in found:
                found["url"] = line.split(" at ")[-1].strip()
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout_s)
    if "url" not in found:
        process.kill()
        raise RuntimeError(f"sluice serve did not start (exit code {process.poll()}): {''.join(lines[-20:])}")
    return process, found["url"]


def main(argv: list[str]) -> int:
    print(json.dumps(bench_sync(argv)))
    return 0
