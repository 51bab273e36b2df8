"""The token budget of a packed micro-batch when --max-tokens-per-gpu is not given.

On a GPU the budget is what the free memory holds once the weights are loaded: the memory the first optimizer
step will still take (float32 gradients and AdamW's two moments, allocated lazily; only the gradients with
--optimizer-cpu-offload) is set aside, and so is a
margin for the allocator's fragmentation and the LM head's chunk of logits; the rest, divided by the bytes of
activations one token keeps for the backward pass, is the budget. The per-token figure counts what a dense
decoder layer saves (see ``activation_bytes_per_token``) and is an estimate: a run that still runs out of memory
names --max-tokens-per-gpu in its error. On a CPU memory is rarely the limit and large micro-batches gain
nothing, so the budget is a fixed ``CPU_TOKEN_BUDGET``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CPU_TOKEN_BUDGET = 16384
MIN_TOKEN_BUDGET = 1024  # below this a GPU runs too small kernels to be worth it; an OOM then names the flag
FREE_MEMORY_USE = 0.75  # of the memory left after the optimizer state: the rest covers fragmentation,
# the LM head's chunks, compiled kernels' workspaces and the autocast copies of the weights


@dataclass(frozen=True)
class DecoderShape:
    """What the activation estimate needs of a dense decoder's config."""

    num_layers: int
    hidden: int
    q_size: int  # query heads x head dim
    kv_size: int  # key/value heads x head dim
    intermediate: int

    @classmethod
    def of(cls, config) -> "DecoderShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, config.hidden_size, heads * head_dim, kv_heads * head_dim,
                   config.intermediate_size)


def activation_bytes_per_token(shape: DecoderShape, element_bytes: int,
                               segments: Sequence[tuple[int, int, bool]] | None = None) -> int:
    """Bytes one token keeps for the backward pass across the decoder; ``segments`` are the recompute plan's
    ``(first layer, end layer, checkpointed)`` runs (``RecomputePlan.segments``; None: nothing recomputed).

    A layer that is not recomputed saves about (in elements of the compute dtype): its two norms' inputs and
    outputs and their float32 statistics (6 x hidden), the QKV projection and the rotated q and k
    (2 x q + 2 x kv + kv), the attention output (q), K and V repeated to the query heads where the varlen kernel
    has no GQA (2 x q), the gate/up projection (2 x intermediate; ``SwiGLUDown`` recomputes the SwiGLU output
    instead of keeping it) and the sublayer outputs (2 x hidden). tests/unit/test_native_trainer.py holds it
    against the bytes autograd actually saves per token (bf16 autocast, eager ops on CPU; the GPU's compiled
    ops and varlen kernel are not measured): 42.6 KB per layer for a model of the Qwen2.5-0.5B proportions,
    where this gives 43.5. A checkpointed segment keeps only its two inputs (the hidden state and the residual
    stream), and during the backward pass one segment at a time is rebuilt whole: the largest segment's layers
    are counted as stored on top.
    """
    per_layer = 8 * shape.hidden + 5 * shape.q_size + 3 * shape.kv_size + 2 * shape.intermediate
    segments = segments or [(0, shape.num_layers, False)]
    stored = sum(end - first for first, end, checkpointed in segments if not checkpointed)
    checkpointed = [end - first for first, end, on in segments if on]
    rebuilt = max(checkpointed, default=0)
    return element_bytes * ((stored + rebuilt) * per_layer + len(checkpointed) * 2 * shape.hidden)


def derived_token_budget(device: torch.device, shape: DecoderShape, pending_step_bytes: int, element_bytes: int,
                         segments: Sequence[tuple[int, int, bool]] | None = None) -> int:
    """The --max-tokens-per-gpu default on ``device`` (see the module docstring). ``pending_step_bytes``: what the
    first optimizer steps still allocate on the device, over every trained model (actor and critic): per
    parameter a float32 gradient and AdamW's two moments, 12 bytes, or 4 when the moments are in host memory
    (--optimizer-cpu-offload)."""
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    free -= pending_step_bytes  # allocated lazily, at the first backward pass and step
    per_token = activation_bytes_per_token(shape, element_bytes, segments)
    budget = int(max(free, 0) * FREE_MEMORY_USE) // per_token
    return max(MIN_TOKEN_BUDGET, budget)
