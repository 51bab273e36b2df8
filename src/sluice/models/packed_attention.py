"""Causal self-attention over packed variable-length sequences, with no dense ``[T, T]`` mask anywhere.

Layout: the sequences of a micro-batch lie back to back in one token dimension of length ``T``; the tokens of
sequence ``i`` are ``[cu_seqlens[i], cu_seqlens[i + 1])``, ``cu_seqlens[0] == 0`` and ``cu_seqlens[-1] == T``
(``cu_seqlens_from_lengths`` builds it). A token attends to itself and the earlier tokens of its own sequence
only. Positions restart at 0 in every sequence: that is the caller's job, through the position ids it gives the
rotary embedding before calling this.

Backends (``attention_backend`` picks one per call; ``backend=`` forces one):
- ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (Flash-Attention kernels, one launch for all
  sequences, autograd registered by torch). Used for fp16/bf16 CUDA tensors on compute capability 8.x/9.x with a
  head dim that is a multiple of 8 and at most 256. Its signature moved between torch releases, so the arguments
  are matched to the installed one: causal is ``window_size=(-1, 0)`` (newer) or ``is_causal=True`` (torch 2.10);
  without ``enable_gqa`` (torch 2.11) the KV heads are repeated (``repeat_interleave``, query head ``h`` reads KV
  head ``h // (Hq / Hkv)``, as in SDPA's ``enable_gqa``), at the cost of ``Hq / Hkv`` times the K/V memory;
  without ``scale`` the queries are pre-scaled. Not used on compute capability >= 10: torch routes those to
  cuDNN, which rejects both GQA and the causal window.
- ``"sdpa"``: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` per sequence, exact for any
  dtype and device. Sequences of equal length are batched into one call, so the Python loop runs once per
  distinct length, not once per sequence. It reads ``cu_seqlens`` on the host (a device sync on CUDA); it is the
  reference and the fallback (CPU, float32/float64 on CUDA), not the fast path.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sluice.models.fused import rms_norm, rotary
from sluice.models.layers import RMSNorm

_VARLEN_MAX_HEAD_DIM = 256  # Flash-Attention 2's limit


@dataclass(frozen=True)
class PackedCausalAttention:
    """The trainer's attention backend (``models/attention.py``): q/k head norm, rotary at the given positions
    (restarting at 0 in every sequence), then ``packed_causal_attention`` over the micro-batch's sequences."""

    cu_seqlens: Tensor  # [S + 1] int32, on the tokens' device
    max_seqlen: int
    norm: Callable = rms_norm  # the implementations to compose (compiled ones on GPU)
    rotate: Callable = rotary
    backend: str = "auto"
    offsets: tuple[int, ...] | None = None  # cu_seqlens on the host, when the caller has them: the SDPA path reads
    # them in every layer, which from a device tensor waits for the device each time

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                 q_norm: RMSNorm | None, k_norm: RMSNorm | None, scale: float) -> Tensor:
        if q_norm is not None:
            q = self.norm(q, q_norm.weight, q_norm.eps)
            k = self.norm(k, k_norm.weight, k_norm.eps)
        q, k = self.rotate(positions, q, k, cos, sin)
        return packed_causal_attention(q, k, v, self.cu_seqlens, self.max_seqlen, scale, backend=self.backend,
                                       offsets=self.offsets)


def cu_seqlens_from_lengths(lengths: Sequence[int] | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Sequence lengths ``[S]`` -> cumulative offsets ``[S + 1]`` (int32, starting at 0): sequence ``i`` is
    ``[cu[i], cu[i + 1])``."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    if lengths.dim() != 1 or (lengths < 0).any():
        raise ValueError(f"lengths must be a 1-d tensor of non-negative ints, got {lengths.tolist()}")
    return F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def attention_backend(q: Tensor) -> str:
    """``"varlen"`` where ``varlen_attn`` can run these queries (see the module docstring), else ``"sdpa"``."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    head_dim = q.shape[-1]
    if head_dim % 8 != 0 or head_dim > _VARLEN_MAX_HEAD_DIM:
        return "sdpa"
    if torch.cuda.get_device_capability(q.device)[0] not in (8, 9):
        return "sdpa"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "varlen"


def packed_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, *,
                            backend: str = "auto", offsets: Sequence[int] | None = None) -> Tensor:
    """``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` (``Hq`` a multiple of ``Hkv``) -> ``out [T, Hq, D]``, causal within
    each sequence of ``cu_seqlens`` (``[S + 1]``, see the module docstring), differentiable in q, k, v.

    ``max_seqlen`` is the longest sequence (the varlen kernel sizes its grid by it; too small a value gives wrong
    results there, so pass the true maximum). ``scale`` multiplies ``q @ k.T`` (usually ``D ** -0.5``).
    ``backend``: ``"auto"`` (``attention_backend(q)``), ``"varlen"`` or ``"sdpa"``. ``offsets``: the same values
    as ``cu_seqlens`` as host ints, if the caller has them (the SDPA path then does not read the device).
    """
    _check_shapes(q, k, v, cu_seqlens)
    if backend not in ("auto", "varlen", "sdpa"):
        raise ValueError(f"backend must be 'auto', 'varlen' or 'sdpa', got {backend!r}")
    if q.shape[0] == 0:
        return q.clone()  # no tokens: an empty output that stays in the graph
    if backend == "auto":
        backend = attention_backend(q)
    if backend == "varlen":
        return _varlen_attention(q, k, v, cu_seqlens.to(device=q.device, dtype=torch.int32), max_seqlen, scale)
    return _per_length_sdpa(q, k, v, list(offsets) if offsets is not None else cu_seqlens.tolist(), scale)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be [S + 1], got shape {tuple(cu_seqlens.shape)}")


@functools.cache
def _varlen_parameters(varlen_attn) -> frozenset[str]:
    """``varlen_attn``'s keyword names, read once per function (this runs in every layer's forward)."""
    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float) -> Tensor:
    """One ``varlen_attn`` call, its arguments matched to the installed torch's signature."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_parameters(varlen_attn)
    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel's default scale is D ** -0.5
    num_groups = q.shape[1] // k.shape[1]
    if num_groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(num_groups, dim=1), v.repeat_interleave(num_groups, dim=1)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens, max_seqlen,
                       max_seqlen, **kwargs)


def _per_length_sdpa(q: Tensor, k: Tensor, v: Tensor, offsets: list[int], scale: float) -> Tensor:
    """Exact causal SDPA for every sequence (``offsets``: cu_seqlens as host ints); sequences of equal length share
    one batched call."""
    if offsets[0] != 0 or offsets[-1] != q.shape[0] or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={q.shape[0]}, got {offsets}")
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(offsets, offsets[1:]):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    token_index, outputs = [], []
    for length, starts in starts_by_length.items():
        index = torch.tensor(starts, device=q.device).unsqueeze(1) + torch.arange(length, device=q.device)
        as_batch = lambda x: x[index].transpose(1, 2)  # noqa: E731  [G, L, H, D] -> [G, H, L, D]
        out = F.scaled_dot_product_attention(as_batch(q), as_batch(k), as_batch(v), is_causal=True, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        token_index.append(index.reshape(-1))
        outputs.append(out.transpose(1, 2).reshape(-1, *q.shape[1:]))
    order = torch.cat(token_index)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=q.device)
    return torch.cat(outputs)[inverse]
