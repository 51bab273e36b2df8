"""--optimizer-cpu-offload: AdamW's float32 master weights and moments live in host memory and its step runs
on the host, as Megatron's ``--optimizer-cpu-offload`` does; the device keeps the weights in the compute dtype.

Memory per trainable parameter (bf16 compute):

=========  =====================================================================================================
device     2 B weight (bf16) + 4 B float32 gradient, accumulated over the step's micro-batches and freed after
           its optimizer step; a parameter's bf16 gradient exists only until it is added in
host       12 B: the float32 master and AdamW's two moments; plus pinned staging buffers for the largest chunk
=========  =====================================================================================================

against 16 B on the device without it (float32 weight, gradient and two moments). For a 7B model that is 45 GB
instead of 122 GB: what makes it train on one 80 GB GPU.

One optimizer step:

1. the gradient norm is taken on the device over the float32 gradients, clipped there (--clip-grad), and the
   guard may refuse the step (then nothing moves);
2. the parameters go through in chunks (``CHUNK_NUMEL`` elements or one larger parameter): a chunk's gradients
   are copied to a pinned host buffer on one side stream while the host steps the previous chunk; the host runs
   AdamW on the chunk's masters (``torch.optim.AdamW`` skips parameters without a gradient, so each call steps
   only that chunk; its state is therefore keyed and saved exactly as the on-device optimizer's is, and a
   checkpoint resumes with or without offload); the updated masters, cast to the compute dtype into another
   pinned buffer, go back to the device weights on another side stream while the next chunk is stepped.

Megatron's ``--overlap-cpu-optimizer-d2h-h2d`` names that overlap; here it is always on. The host step uses
torch's fused AdamW kernel for CPUs, vectorised and threaded: it runs with ``host_threads`` intra-op threads
(the trainer gives each process of a train pool its share of the host's CPUs), whatever the process had, since
Ray starts an actor with one thread per CPU it reserved, which would leave a 7B step on one core.

Concurrency hazard: two side streams read the gradients (device to host) and write the weights (host to
device). Each waits for the compute stream before its copies, and the compute stream waits for both before the
step returns, so the next forward sees the new weights and the gradients are freed only once their copies are
done.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from sluice.trainer.host_memory import available_host_memory, check_host_memory

CHUNK_NUMEL = 64 * 1024 * 1024  # elements per host step: 256 MiB of float32 gradients per staging buffer


class HostMasters:
    """The float32 masters (host) of a model whose trainable weights sit on ``device`` in ``compute_dtype``.

    Built from a model loaded in float32 on the host: its parameters' storage becomes the masters and each
    parameter gets a fresh device copy in the compute dtype (buffers, such as rotary tables, move as they are).
    The gradients of a backward pass accumulate into float32 device tensors (``gradients``), not ``.grad``.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype,
                 host_threads: int | None = None):
        self.device, self.compute_dtype = device, compute_dtype
        self.host_threads = host_threads  # intra-op threads of the host step; None: the process's setting
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The loaded float32 storage is the master; the parameter moves to a new device tensor (copy=True: never
        # aliased, even where device and dtype are already the host's float32).
        self.masters = [p.detach() for p in self.params]
        for param in self.params:
            if param.dtype != torch.float32 or param.device.type != "cpu":
                raise ValueError(f"HostMasters needs a model loaded in float32 on the host, got a {param.dtype} "
                                 f"parameter on {param.device}")
            param.data = param.detach().to(device, compute_dtype, copy=True)
        model.to(device)
        self.gradients: list[Tensor | None] = [None] * len(self.params)
        for index, param in enumerate(self.params):
            param.register_post_accumulate_grad_hook(functools.partial(self._accumulate, index))
        self._staging: _Staging | None = None
        self.released = False  # the device weights given back by ``release`` (--offload-train)

    def _accumulate(self, index: int, param: Tensor) -> None:
        """Autograd's hook after ``param.grad`` is complete for one backward: add it to the float32 gradient."""
        grad = param.grad
        if self.gradients[index] is None:
            self.gradients[index] = grad.to(torch.float32, copy=True)
        else:
            self.gradients[index].add_(grad)
        param.grad = None  # the compute-dtype gradient lives only until it is added in

    def zero_grad(self) -> None:
        self.gradients = [None] * len(self.params)

    # ---- the optimizer step -----------------------------------------------------------------------------
    def clip(self, clip_grad: float) -> float:
        """The global norm of the accumulated gradients; they are scaled down to ``clip_grad`` (0: off)."""
        grads = [g for g in self.gradients if g is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads)
        if clip_grad > 0:
            scale = torch.clamp(clip_grad / (norm + 1e-6), max=1.0)  # torch's clip_grad_norm_ rule
            torch._foreach_mul_(grads, scale)
        return float(norm)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """AdamW on the host over the chunks of parameters that have a gradient; the device weights follow."""
        chunks = _chunks([i for i, g in enumerate(self.gradients) if g is not None], self.masters, CHUNK_NUMEL)
        with _intra_op_threads(self.host_threads):
            self._step_chunks(optimizer, chunks)

    def _step_chunks(self, optimizer: torch.optim.Optimizer, chunks: list[list[int]]) -> None:
        if self.device.type != "cuda":
            for chunk in chunks:  # host tensors already: the gradients serve as the masters' gradients
                self._step_chunk(optimizer, chunk, [self.gradients[i] for i in chunk])
                for i in chunk:
                    self.params[i].copy_(self.masters[i])
            return
        if not chunks:
            return
        staging = self._staging  # made by ``reserve``, sized for any chunking
        staging.fetch(0, chunks[0], self.gradients)
        for k, chunk in enumerate(chunks):
            if k + 1 < len(chunks):  # its buffer's previous chunk was stepped already: the host waited for it
                staging.fetch(k + 1, chunks[k + 1], self.gradients)
            self._step_chunk(optimizer, chunk, staging.gradients(k))
            staging.send(k, chunk, self.masters, self.params)
        staging.finish()

    def _step_chunk(self, optimizer: torch.optim.Optimizer, chunk: list[int], grads: list[Tensor]) -> None:
        for i, grad in zip(chunk, grads):
            self.masters[i].grad = grad
        optimizer.step()  # steps exactly the masters that have a gradient
        for i in chunk:
            self.masters[i].grad = None

    # ---- start-up and --offload-train ---------------------------------------------------------------------
    def reserve(self, optimizer: torch.optim.Optimizer) -> None:
        """Allocate now what the steps will need on the host: AdamW's two moments (``optimizer`` is the AdamW
        over the masters; its state starts as zeros at step 0, as the first step would make it) and, beside a
        GPU, the pinned staging buffers. Checked against the host's available memory first, so a lack of it
        fails at start-up, and a second model's check (the PPO critic's) sees this one's share gone."""
        numel = sum(m.numel() for m in self.masters)
        largest = _largest_chunk(self.masters)
        staging = _Staging.host_bytes(largest, self.compute_dtype) if self.device.type == "cuda" else 0
        check_host_memory(8 * numel + staging, f"AdamW's moments and staging buffers for {numel / 1e9:.2f}B "
                          f"parameters (--optimizer-cpu-offload)", available_host_memory())
        for master in self.masters:
            state = optimizer.state[master]
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # on the host, where the fused kernel steps
            state["exp_avg"] = torch.zeros_like(master)
            state["exp_avg_sq"] = torch.zeros_like(master)
        if self.device.type == "cuda":
            self._staging = _Staging(largest, self.compute_dtype, self.device)

    @torch.no_grad()
    def release(self, model: torch.nn.Module) -> None:
        """--offload-train: give the device weights back (the masters hold them); buffers go to the host."""
        for param in self.params:
            param.data = torch.empty(0, dtype=self.compute_dtype)
        model.to("cpu")
        self.released = True

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        """After ``release``: the device weights again, cast from the masters (exactly what they were)."""
        model.to(self.device)
        for param, master in zip(self.params, self.masters):
            param.data = master.to(self.device, self.compute_dtype, copy=True)
        self.released = False

    # ---- state -------------------------------------------------------------------------------------------
    def model_state(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """``model.state_dict()`` with the float32 masters in place of the compute-dtype weights."""
        master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        return {name: master_of.get(id(value), value.detach())
                for name, value in model.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_model_state(self, model: torch.nn.Module, state: dict[str, Tensor]) -> None:
        """Load a ``model_state`` (float32): the masters exactly, the device weights as their cast."""
        model.load_state_dict(state)  # checks the names and shapes, loads the buffers
        index = {id(p): i for i, p in enumerate(self.params)}
        for name, value in model.state_dict(keep_vars=True).items():
            if id(value) in index:
                i = index[id(value)]
                self.masters[i].copy_(state[name])
                self.params[i].copy_(self.masters[i])


def host_optimizer_step(host: HostMasters, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, clip_grad: float,
                        accept: Callable[[float], bool] = math.isfinite) -> tuple[float, bool]:
    """``optimizer.optimizer_step`` for offloaded masters: clip, step on the host unless ``accept`` refuses,
    free the gradients either way. Returns (grad norm, whether the step was applied)."""
    grad_norm = host.clip(clip_grad)
    applied = accept(grad_norm)
    if applied:
        host.step(optimizer)
        scheduler.step()
    host.zero_grad()
    return grad_norm, applied


@contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _largest_chunk(masters: list[Tensor]) -> int:
    """Elements of the largest chunk ``_chunks`` can form over ``masters``, whichever have a gradient."""
    total = sum(m.numel() for m in masters)
    return min(total, max([CHUNK_NUMEL] + [m.numel() for m in masters]))


def _chunks(indices: list[int], tensors: list[Tensor], max_numel: int) -> list[list[int]]:
    """Consecutive runs of ``indices`` of at most ``max_numel`` elements (a larger tensor alone)."""
    chunks: list[list[int]] = []
    numel = 0
    for i in indices:
        size = tensors[i].numel()
        if not chunks or numel + size > max_numel:
            chunks.append([])
            numel = 0
        chunks[-1].append(i)
        numel += size
    return chunks


class _Staging:
    """Two pinned gradient buffers and two pinned weight buffers, used alternately by consecutive chunks, and
    the side streams that copy through them (see the module docstring): one per direction, so gradients leaving
    and weights arriving use both of the GPU's copy engines at once."""

    @staticmethod
    def host_bytes(numel: int, compute_dtype: torch.dtype) -> int:
        """Pinned bytes of the four buffers for ``numel`` elements; torch's pinned allocator rounds each block up
        to a power of two."""
        element = torch.finfo(compute_dtype).bits // 8
        return 2 * (_power_of_two_above(4 * numel) + _power_of_two_above(element * numel))

    def __init__(self, numel: int, compute_dtype: torch.dtype, device: torch.device):
        self.numel = numel
        self.grads = [torch.empty(numel, dtype=torch.float32, pin_memory=True) for _ in range(2)]
        self.weights = [torch.empty(numel, dtype=compute_dtype, pin_memory=True) for _ in range(2)]
        self.device = device
        self.d2h, self.h2d = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.fetched: list[torch.cuda.Event | None] = [None, None]
        self.fetched_views: list[list[Tensor]] = [[], []]
        self.sent: list[torch.cuda.Event | None] = [None, None]

    def fetch(self, k: int, chunk: list[int], gradients: list[Tensor | None]) -> None:
        """Queue chunk ``k``'s gradients device -> pinned buffer ``k % 2``."""
        buffer = self.grads[k % 2]
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # the gradients are final (clipped) there
        views = _views(buffer, [gradients[i] for i in chunk])
        with torch.cuda.stream(self.d2h):
            for view, i in zip(views, chunk):
                view.copy_(gradients[i], non_blocking=True)
            self.fetched[k % 2] = self.d2h.record_event()
        self.fetched_views[k % 2] = views

    def gradients(self, k: int) -> list[Tensor]:
        """Chunk ``k``'s gradients on the host, once their copy is done."""
        self.fetched[k % 2].synchronize()
        return self.fetched_views[k % 2]

    def send(self, k: int, chunk: list[int], masters: list[Tensor], params: list[Tensor]) -> None:
        """Cast chunk ``k``'s updated masters into pinned buffer ``k % 2`` and queue them to the device weights."""
        b = k % 2
        if self.sent[b] is not None:
            self.sent[b].synchronize()  # the copy from this buffer two chunks ago has left it
        views = _views(self.weights[b], [masters[i] for i in chunk])
        for view, i in zip(views, chunk):
            view.copy_(masters[i])
        self.h2d.wait_stream(torch.cuda.current_stream(self.device))  # the backward pass is done with the weights
        with torch.cuda.stream(self.h2d):
            for view, i in zip(views, chunk):
                params[i].copy_(view, non_blocking=True)
            self.sent[b] = self.h2d.record_event()

    def finish(self) -> None:
        """The compute stream waits for every copy: the next forward sees the new weights, and the gradients
        (allocated on the compute stream) are freed only after their copies."""
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.d2h)
        current.wait_stream(self.h2d)


def _power_of_two_above(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Consecutive views of ``flat`` shaped as the tensors of ``like``."""
    views, offset = [], 0
    for tensor in like:
        views.append(flat[offset: offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return views
