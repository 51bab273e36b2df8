"""Token log-probs (and entropy) straight from the last hidden states, chunk by chunk, forward and backward.

The same numbers as ``log_probs_from_logits(hidden @ weight.T, targets, temperature)`` and
``entropy_from_logits((hidden @ weight.T) / temperature)`` (see ``sluice.algorithms``), without ever holding the
``[N, V]`` logits: 16k tokens x 151,936 vocabulary is 9.25 GiB in float32, and autograd through the plain path
keeps several such tensors for backward. Here a ``torch.autograd.Function`` keeps only ``hidden``, ``weight``,
``targets`` and two per-token statistics, and the backward recomputes each chunk's logits.

Per chunk of tokens: ``a = hidden_c @ weight.T`` in the inputs' dtype (bf16 under mixed precision, as the LM head
would compute it), upcast to at least float32, ``z = a / temperature``, then
``lse = logsumexp(z)``, ``logprob = z[target] - lse``, ``p = exp(z - lse)``, ``m = sum_v p_v z_v`` and
``H = lse - m`` (the entropy form of ``algorithms/entropy.py``: no ``log p``, so no ``0 * log 0``).

Gradients (per token; ``g_lp``, ``g_H`` are the upstream gradients of that token's log-prob and entropy):

    d logprob / dz_v = onehot(target)_v - p_v
    d H / dz_v       = -p_v (z_v - m)          (from dp_u/dz_v = p_u (delta_uv - p_v))
    dL / dz          = g_lp onehot(target) - p (g_lp + g_H (z - m))
    dL / da          = (dL / dz) / temperature
    grad_hidden_c    = (dL / da) @ weight                    [chunk, H]
    grad_weight      = sum over chunks of (dL / da).T @ hidden_c   [V, H]

``grad_weight`` is summed over chunks in float32 (float64 for float64 inputs) and cast to the weight's dtype at
the end; each chunk's product is one matmul in the inputs' dtype (tensor cores accumulate it in float32).

Hazards:
- the outputs are float32, or float64 for float64 inputs ("at least float32"): bf16 log-probs carry about three
  significant digits, too few for an importance ratio.
- the entropy is finite-safe: ``z`` is clamped to the most negative finite float before use, so a ``-inf`` logit
  (impossible from a matmul of finite inputs, but cheap to guard) has ``p = 0`` and ``0 * finite = 0`` in forward
  and backward, as in ``entropy_from_logits``. ``+inf`` / NaN hidden states are not guarded.
- no bias: the LM heads in sluice's models have none (Qwen2/Llama ``lm_head`` is ``bias=False``); a head with a
  bias would need ``+ bias`` on ``a`` and a ``grad_bias = sum over tokens of dL/da``.
- ``logits[t]`` predicts ``targets[t]``: pass ``hidden`` and ``targets`` already shifted.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements in one chunk's float32 logits: 2**26 * 4 bytes = 256 MiB. The backward holds about two such buffers
# (z and p) plus a half-precision copy for the matmuls, so well under 1 GiB of transients per chunk. For Qwen's
# 151,936-token vocabulary that is 441 tokens per chunk: each chunk re-reads the weight once and does ~441 FLOP per
# weight byte read (2 * chunk FLOP per 2-byte element), above an H100's ~300 FLOP/byte balance point, so the
# matmul stays compute-bound and smaller chunks would start paying for re-reading the weight.
_CHUNK_ELEMENTS = 2**26


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits are at most 256 MiB (at least one token)."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half, bf16 and float32 inputs; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled_logits(hidden_chunk: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """``z = (hidden_chunk @ weight.T) / temperature`` upcast to at least float32, -inf clamped to finite."""
    z = (hidden_chunk @ weight.T).to(_stats_dtype(hidden_chunk.dtype))
    if temperature != 1.0:
        z.div_(temperature)
    return z.clamp_(min=torch.finfo(z.dtype).min)


def _forward_chunks(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                    chunk_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> ``logprobs [N]``, ``lse [N]``, ``m [N]`` (``sum p z``, only with entropy) in the stats dtype."""
    num_tokens = hidden.shape[0]
    stats = dict(dtype=_stats_dtype(hidden.dtype), device=hidden.device)
    logprobs, lse = torch.empty(num_tokens, **stats), torch.empty(num_tokens, **stats)
    mean_z = torch.empty(num_tokens, **stats) if with_entropy else None
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, start + chunk_size)
        z = _scaled_logits(hidden[rows], weight, temperature)
        lse_c = torch.logsumexp(z, dim=-1)
        logprobs[rows] = z.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - lse_c
        lse[rows] = lse_c
        if mean_z is not None:
            mean_z[rows] = (z - lse_c.unsqueeze(-1)).exp_().mul_(z).sum(dim=-1)
    return logprobs, lse, mean_z


def _grad_scaled_logits(z: Tensor, lse: Tensor, mean_z: Tensor | None, targets: Tensor, grad_logprobs: Tensor | None,
                        grad_entropy: Tensor | None) -> Tensor:
    """``dL/dz = g_lp onehot(target) - p (g_lp + g_H (z - m))`` for one chunk, computed in place over ``z``."""
    p = (z - lse.unsqueeze(-1)).exp_()
    g_lp = grad_logprobs.to(z.dtype) if grad_logprobs is not None else torch.zeros_like(lse)
    if grad_entropy is not None:
        coeff = z.sub_(mean_z.unsqueeze(-1)).mul_(grad_entropy.to(z.dtype).unsqueeze(-1)).add_(g_lp.unsqueeze(-1))
    else:
        coeff = g_lp.unsqueeze(-1)
    grad = p.mul_(coeff).neg_()
    if grad_logprobs is not None:
        grad.scatter_add_(-1, targets.unsqueeze(-1), g_lp.unsqueeze(-1))
    return grad


class _ChunkedLMHead(torch.autograd.Function):
    """Autograd for ``token_logprobs_from_hidden``; saves no ``[N, V]`` tensor (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size):
        logprobs, lse, mean_z = _forward_chunks(hidden, weight, targets, temperature, with_entropy, chunk_size)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)  # an unused output costs no backward work
        if not with_entropy:
            ctx.save_for_backward(hidden, weight, targets, lse)
            return logprobs
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        return logprobs, lse - mean_z

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward is hand-written: no second derivatives
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, targets, lse, *rest = ctx.saved_tensors
        mean_z = rest[0] if rest else None
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=_stats_dtype(weight.dtype), device=weight.device) \
            if needs_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            z = _scaled_logits(hidden[rows], weight, ctx.temperature)
            grad_z = _grad_scaled_logits(
                z, lse[rows], mean_z[rows] if mean_z is not None else None, targets[rows],
                grad_logprobs[rows] if grad_logprobs is not None else None,
                grad_entropy[rows] if grad_entropy is not None else None)
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            grad_a = grad_z.to(hidden.dtype)  # the matmuls run in the inputs' dtype, like autograd's would
            del z, grad_z
            if needs_hidden:
                grad_hidden[rows] = grad_a @ weight
            if needs_weight:
                if grad_weight.dtype == hidden.dtype:
                    grad_weight.addmm_(grad_a.T, hidden[rows])
                else:
                    grad_weight += grad_a.T @ hidden[rows]  # one half-precision chunk product, summed in float32
        if needs_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs_from_hidden(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, *,
                               with_entropy: bool, chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``hidden [N, H]``, LM-head ``weight [V, H]``, ``targets [N]`` -> ``logprobs [N]``, ``entropy [N]`` or None.

    ``logprobs = log_softmax(hidden @ weight.T / temperature)[targets]`` over the full vocabulary and the entropy
    of that distribution, float32 (float64 for float64 inputs), differentiable in ``hidden`` and ``weight`` with
    memory O(chunk_size x V). ``chunk_size`` defaults to ``default_chunk_size(V)``. Under ``torch.no_grad()``, or
    when neither input requires grad, nothing is saved for backward.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets = targets.long()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = _ChunkedLMHead.apply(hidden, weight, targets, float(temperature), with_entropy, chunk_size)
        return (out[0], out[1]) if with_entropy else (out, None)
    logprobs, lse, mean_z = _forward_chunks(hidden, weight, targets, float(temperature), with_entropy, chunk_size)
    return logprobs, (lse - mean_z) if with_entropy else None
