"""A process group between a trainer (rank 0) and engines, for broadcasting new weights.

Built from a ``TCPStore`` and a backend object constructed directly, so neither side needs, or disturbs,
``torch.distributed``'s default process group (a trainer already has one for FSDP; an engine has none).

The store keys are laid out exactly as by the ``init_custom_process_group`` helper that SGLang's engine and slime's
trainer use (``PrefixStore(group_name)``, then torch's ``"{group_name}/"`` and ``"{device}/"`` prefixes), so this
side can meet a trainer or an engine built on that helper, as well as another ``WeightGroup``.

Broadcast order is the contract: the trainer sends the tensors in the order of the ``names`` list it posted, one
broadcast per tensor (SGLang's form), or one broadcast of the whole bucket's bytes (``receive_bucket``, our
``flattened_bucket`` form, laid out by ``weights.buckets.bucket_layout``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import torch
from torch.distributed import BroadcastOptions, PrefixStore, ProcessGroupGloo, TCPStore

from sluice.weights.buckets import TensorSlot, unflatten_bucket

TRAINER_RANK = 0


@dataclass
class WeightGroup:
    name: str
    rank: int
    world_size: int
    backend: str  # "gloo" (tensors on CPU) or "nccl" (tensors on ``device``)
    device: torch.device  # where received tensors are allocated
    process_group: Any  # ProcessGroupGloo | ProcessGroupNCCL
    store: TCPStore  # kept alive for the group's lifetime

    def broadcast(self, tensor: torch.Tensor) -> None:
        """In place: the trainer's tensor is sent, every other rank's is overwritten."""
        options = BroadcastOptions()
        options.rootRank = TRAINER_RANK
        self.process_group.broadcast([tensor], options).wait()


def join_weight_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str,
    device: torch.device = torch.device("cpu"), timeout: timedelta = timedelta(minutes=10),
) -> WeightGroup:
    """Join (rank > 0) or host (rank 0) the group; blocks until every rank has joined."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group of {world_size}")
    is_master = rank == TRAINER_RANK
    # As torch's tcp:// rendezvous does: each client counts itself in, the master waits for all of them.
    store = TCPStore(master_address, master_port, world_size, is_master=is_master, timeout=timeout,
                     multi_tenant=is_master)
    group_store = PrefixStore(f"{group_name}/", PrefixStore(group_name, store))
    if backend == "gloo":
        device = torch.device("cpu")
        process_group = _gloo(PrefixStore("cpu/", group_store), rank, world_size, timeout,
                              local_address_towards(master_address, master_port))
    elif backend == "nccl":
        process_group = _nccl(PrefixStore("cuda/", group_store), rank, world_size, timeout, device)
    else:
        raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
    return WeightGroup(group_name, rank, world_size, backend, device, process_group, store)


def receive_weights(group: WeightGroup, names: list[str], dtypes: list[torch.dtype],
                    shapes: list[list[int]]) -> dict[str, torch.Tensor]:
    """Receive one broadcast per name, in order, into fresh tensors on the group's device."""
    received = {}
    for name, dtype, shape in zip(names, dtypes, shapes):
        tensor = torch.empty(shape, dtype=dtype, device=group.device)
        group.broadcast(tensor)
        received[name] = tensor
    return received


def receive_bucket(group: WeightGroup, slots: list[TensorSlot], total_bytes: int) -> dict[str, torch.Tensor]:
    """Receive a flattened bucket (one broadcast of ``total_bytes``) and return views of it by name."""
    buffer = torch.empty(total_bytes, dtype=torch.uint8, device=group.device)
    group.broadcast(buffer)
    return unflatten_bucket(buffer, slots)


def send_weights(group: WeightGroup, named_tensors: Mapping[str, torch.Tensor]) -> None:
    """The trainer's side: broadcast each tensor in the mapping's order (the order of the posted names)."""
    for tensor in named_tensors.values():
        group.broadcast(tensor.detach().to(group.device).contiguous())


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` or ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _gloo(store, rank: int, world_size: int, timeout: timedelta, local_address: str):
    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    # Bind to the interface that reaches the master: gloo's default resolves the hostname, which on many
    # machines maps to an address other ranks cannot reach.
    options._devices = [ProcessGroupGloo.create_device(hostname=local_address)]
    return ProcessGroupGloo(store, rank, world_size, options)


def _nccl(store, rank: int, world_size: int, timeout: timedelta, device: torch.device):
    from torch.distributed import ProcessGroupNCCL

    if device.type != "cuda":
        raise ValueError(f"the nccl backend needs a CUDA engine device, not {device}")
    torch.cuda.set_device(device)
    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    options.is_high_priority_stream = False
    return ProcessGroupNCCL(store, rank, world_size, options)


def local_address_towards(host: str, port: int) -> str:
    """The local IP address the OS would use to reach ``host`` (no packet is sent: UDP connect only routes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
