"""A model the trainer updates, with its AdamW: where its float32 master weights live, the gradients summed over a
train pool, the clipped step, its checkpoint state and its moves for --offload-train.

The actor and the PPO critic each hold one, so both train the same way: float32 master weights and AdamW moments
(the parameters themselves, computing in --train-dtype under autocast), or with --optimizer-cpu-offload host
masters behind compute-dtype weights on the device (host_optimizer.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from sluice.config import TrainConfig
from sluice.trainer.data_parallel import DataParallel
from sluice.trainer.host_optimizer import HostMasters, host_optimizer_step
from sluice.trainer.optimizer import build_optimizer, kernels_kept, optimizer_step


class OptimizedModel:
    """``model`` and its optimizer and LR schedule. Data-parallel methods are collectives as ``DataParallel``'s."""

    def __init__(self, load: Callable[[torch.device], torch.nn.Module], train: TrainConfig, device: torch.device,
                 compute_dtype: torch.dtype, data_parallel: DataParallel, lr: float | None = None):
        """``load(device)`` returns the float32 model on ``device``: the training device, or the host when the
        optimizer is offloaded."""
        self.device, self.data_parallel = device, data_parallel
        self.host: HostMasters | None = None
        if train.optimizer_cpu_offload:
            if data_parallel.fsdp:
                raise ValueError("--optimizer-cpu-offload keeps whole float32 masters on each host, which FSDP's "
                                 "sharded weights do not have: drop it for a sharded train pool (FSDP already "
                                 "divides the optimizer state by the number of GPUs), or train on one GPU")
            self.model = load(torch.device("cpu"))
            self.host = HostMasters(self.model, device, compute_dtype, _host_threads(device, data_parallel))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            self.model = data_parallel.shard(load(device), compute_dtype)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, train, lr, masters=self.host.masters if self.host is not None else None)
        if self.host is not None:
            self.host.reserve(self.optimizer)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def step_bytes_per_param(self) -> int:
        """Device bytes per parameter the first step still allocates: float32 gradients, and AdamW's moments
        unless they are on the host."""
        return 4 if self.host is not None else 12

    def reduce_gradients(self) -> None:
        """Sum the step's gradients over the train pool (before the norm, so every rank takes the same step)."""
        if self.host is not None:
            self.host.gradients = self.data_parallel.sum_gradients(self.host.params, self.host.gradients)
        else:
            self.data_parallel.reduce_gradients(self.model)

    def step(self, clip_grad: float, accept: Callable[[float], bool] = math.isfinite) -> tuple[float, bool]:
        """Clip and step unless ``accept(grad_norm)`` refuses; gradients cleared. (grad norm, applied)."""
        if self.host is not None:
            return host_optimizer_step(self.host, self.optimizer, self.scheduler, clip_grad, accept)
        return optimizer_step(self.model, self.optimizer, self.scheduler, clip_grad, accept)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Every weight by the model's names, unsharded (with FSDP a collective). While --offload-train holds host
        masters' device weights released (an export or checkpoint between rollout and training), the masters."""
        if self.host is not None and self.host.released:
            return self.host.model_state(self.model)
        return self.data_parallel.full_weights(self.model)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """The float32 weights under the model's own names (with FSDP a collective: full on rank 0 only)."""
        if self.host is not None:
            return self.host.model_state(self.model)
        return self.data_parallel.model_state(self.model)

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.host is not None:
            self.host.load_model_state(self.model, state)
        else:
            self.data_parallel.load_model_state(self.model, state)

    def optimizer_state(self) -> dict:
        return self.data_parallel.optimizer_state(self.model, self.optimizer)

    def load_optimizer_state(self, state: dict) -> None:
        with kernels_kept(self.optimizer):  # a checkpoint saved with or without offload resumes either way
            self.data_parallel.load_optimizer_state(self.model, self.optimizer, state)

    # ---- --offload-train ------------------------------------------------------------------------------------
    def offload(self) -> None:
        """Off the device: the weights and AdamW moments to host memory; with host masters the device weights
        are dropped instead (the masters hold them, the moments are on the host already)."""
        if self.host is not None:
            self.host.release(self.model)
        else:
            self._move(torch.device("cpu"))

    def onload(self) -> None:
        """Back on the training device after ``offload``."""
        if self.host is not None:
            self.host.restore(self.model)
        else:
            self._move(self.device)

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device, non_blocking=True)


def _host_threads(device: torch.device, data_parallel: DataParallel) -> int | None:
    """The host step's threads beside a GPU: this process's share of the host's CPUs (Ray would leave it one
    thread). Training on the CPU keeps the process's own setting."""
    if device.type != "cuda":
        return None
    return max(1, len(os.sched_getaffinity(0)) // data_parallel.world_size)
