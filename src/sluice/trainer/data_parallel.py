"""Data-parallel training: N processes of a train pool that step together exactly as one process would.

Every rank receives the same full rollout and runs ``update_policy`` identically; only the model passes are
split. The micro-batch layout is the one of a single process (``micro_batch_rows``), and micro-batch ``i``
runs on rank ``i % world_size``. Then:

* logprobs and values: each rank fills its rows into a zero tensor and the tensors are summed, so every rank
  holds the full result (each position is written by exactly one rank: the sum adds only zeros);
* gradients are summed across ranks before clipping and the optimizer step. A sum, not a mean: the loss of a
  micro-batch is already divided by the whole step's token or sequence counts (see loss.py), so the
  gradients of the micro-batches add up to the full batch's gradient wherever they ran;
* metric sums are summed across ranks, so every rank reports, and the non-finite guard judges, the same
  step; the grad norm is taken on the summed gradients, so every rank takes (or skips) the same step.

Two ways to hold the weights:

* replicated (the default on CPU, backend gloo): every rank keeps all weights and optimizer moments; the
  gradients are summed here after the backward passes, in flat buckets per dtype;
* sharded (FSDP2, the default on GPUs with world size > 1): ``fully_shard`` on every decoder layer and on the
  root; FSDP sums the gradient shards itself (divide factor 1). Every FSDP forward and backward is a
  collective, so every rank must run as many of them: a rank with fewer micro-batches runs filler ones
  (a repeat of the step's last micro-batch, its loss multiplied by 0 and its outputs dropped).

Concurrency hazard: every collective here must be entered by every rank of the group in the same order.
That holds as long as every rank calls the trainer's methods in the same order with the same batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# Gradients are summed in flat buckets of at most this many elements (256 MiB in float32): few collectives,
# bounded extra memory.
BUCKET_NUMEL = 64 * 1024 * 1024


class MicroBatch(NamedTuple):
    """One micro-batch this rank runs."""

    rows: Tensor  # row indices into the step's batch (as from ``micro_batch_rows``)
    is_filler: bool  # run only so that every rank enters as many FSDP collectives; contributes nothing


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the train pool and how its results are combined; the default is one process."""

    group: dist.ProcessGroup | None = None  # the train pool's process group; None: a single process
    rank: int = 0  # this process's rank in ``group``
    world_size: int = 1  # number of processes in ``group``
    fsdp: bool = False  # parameters sharded by FSDP2; else replicated, gradients summed by ``reduce_gradients``

    @classmethod
    def create(cls, group: dist.ProcessGroup | None, device: torch.device, fsdp: bool | None = None) -> "DataParallel":
        """The pool of ``group`` (e.g. ``torch.distributed.group.WORLD``), or one process for None.

        ``fsdp``: None shards with FSDP2 on CUDA when the group has more than one rank, and replicates otherwise;
        True or False forces it (FSDP2 also runs on CPU with gloo).
        """
        if group is None:
            return cls()
        world_size = dist.get_world_size(group)
        if fsdp is None:
            fsdp = device.type == "cuda" and world_size > 1
        return cls(group, dist.get_rank(group), world_size, fsdp and world_size > 1)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    # ---- model ----------------------------------------------------------------------------------------
    def shard(self, model: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """``model`` itself; with FSDP, first sharded in place per decoder layer (``_no_split_modules``) and root.

        A ``compute_dtype`` other than the parameters' makes FSDP gather the weights in it (bf16 over the wire)
        while gradients are reduced and kept in float32, next to the float32 master shards."""
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        device_type = next(model.parameters()).device.type
        mesh = dist.DeviceMesh.from_group(self.group, device_type)
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
        if not layers:
            raise ValueError(f"cannot shard {type(model).__name__} with FSDP: it names no decoder layer class "
                             "(_no_split_modules)")
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Sum, not FSDP's default mean: the loss is already normalised by the whole step's counts.
                # A plain SUM collective also works on gloo, which has no PREMUL_SUM or AVG.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    def share(self, micro_batches: list[Tensor]) -> list[MicroBatch]:
        """This rank's micro-batches: ``i % world_size == rank``; with FSDP padded with fillers to the same count
        on every rank."""
        mine = [MicroBatch(rows, False) for rows in micro_batches[self.rank :: self.world_size]]
        if self.fsdp and micro_batches:
            num_per_rank = -(-len(micro_batches) // self.world_size)
            mine += [MicroBatch(micro_batches[-1], True)] * (num_per_rank - len(mine))
        return mine

    # ---- combining results ----------------------------------------------------------------------------
    def sum_(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed in place over the ranks (every rank ends with the sum); returned for chaining."""
        if not self.is_distributed:
            return tensor
        comm_device = self._comm_device()
        if tensor.device == comm_device:
            dist.all_reduce(tensor, group=self.group)
        else:
            on_device = tensor.to(comm_device)
            dist.all_reduce(on_device, group=self.group)
            tensor.copy_(on_device)
        return tensor

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Sum the replicated gradients over the ranks (FSDP has summed its shards already).

        A rank that ran no micro-batch has no gradients: it adds zeros. A parameter no rank computed a gradient
        for keeps ``grad=None``, as in one process (so AdamW skips it there too).
        """
        if not self.is_distributed or self.fsdp:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for param, grad in zip(params, self.sum_gradients(params, [p.grad for p in params], dtype=None)):
            param.grad = grad

    def sum_gradients(self, params: list[Tensor], grads: list[Tensor | None],
                      dtype: torch.dtype | None = torch.float32) -> list[Tensor | None]:
        """Replicated gradients ``grads`` (one per parameter of ``params``, None where this rank has none) summed
        in place over the ranks; a rank without one gets a zero gradient (in ``dtype``, default the parameter's)
        where another rank has one. ``reduce_gradients`` for gradients kept outside ``.grad``."""
        if not self.is_distributed:
            return grads
        has_grad = self.sum_(torch.tensor([g is not None for g in grads], dtype=torch.int32)).tolist()
        grads = [(torch.zeros_like(p, dtype=dtype) if g is None else g) if count > 0 else None
                 for p, g, count in zip(params, grads, has_grad)]
        for bucket in _buckets([g for g in grads if g is not None], BUCKET_NUMEL):
            flat = self.sum_(_flatten_dense_tensors(bucket))
            for grad, summed in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(summed)
        return grads

    def reduce_metric_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-rank metric sums (shares of the step's metrics) -> the step's sums, the same on every rank.

        Gathered as objects because the ranks' key sets can differ (a rank that ran no micro-batch has none);
        summed in rank order on every rank, so all ranks get identical floats.
        """
        if not self.is_distributed:
            return sums
        gathered: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, dict(sums), group=self.group)
        total: dict[str, float] = defaultdict(float)
        for rank_sums in gathered:
            for key, value in rank_sums.items():
                total[key] += value
        return dict(total)

    def _comm_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- weights and checkpoints ----------------------------------------------------------------------
    def full_weights(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """Every weight by HF name, unsharded (detached; no copy when replicated).

        With FSDP this gathers every tensor: every rank must call it, and every rank gets the full weights.
        """
        return {name: _unsharded(value).detach() for name, value in model.state_dict().items()}

    def model_state(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """The model's state dict for a checkpoint. With FSDP a collective: every rank calls it, rank 0 gets the
        full tensors (on CPU) and the other ranks an empty dict."""
        if not self.fsdp:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_state_options())

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict for a checkpoint; with FSDP as ``model_state`` (keyed by parameter name)."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_state_options())

    def load_model_state(self, model: torch.nn.Module, state: dict[str, Tensor]) -> None:
        """Load a ``model_state``; with FSDP every rank calls it with the full state and keeps its shard."""
        if not self.fsdp:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_full_state_options(load=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_full_state_options(load=True))


def _buckets(tensors: list[Tensor], max_numel: int) -> list[list[Tensor]]:
    """Consecutive groups of same-dtype, same-device tensors of at most ``max_numel`` elements (or one tensor)."""
    by_kind: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[]])
    numel: dict[tuple, int] = defaultdict(int)
    for tensor in tensors:
        kind = (tensor.dtype, tensor.device)
        if by_kind[kind][-1] and numel[kind] + tensor.numel() > max_numel:
            by_kind[kind].append([])
            numel[kind] = 0
        by_kind[kind][-1].append(tensor)
        numel[kind] += tensor.numel()
    return [bucket for buckets in by_kind.values() for bucket in buckets if bucket]


def _unsharded(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _full_state_options(load: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Saving: gathered to rank 0's CPU (the other ranks get nothing back); loading: every rank passes the full
    # state and keeps its own shard of it.
    return StateDictOptions(full_state_dict=True, cpu_offload=not load)
