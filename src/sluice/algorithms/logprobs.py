"""Log-probabilities of given tokens under logits: what "log-prob" means everywhere in sluice.

``log_prob(token) = log_softmax(logits / temperature)[token]``, over the FULL vocabulary: the scaling by
the sampling temperature is applied, but top-p / top-k / min-p truncation is NOT. The engine must report
rollout log-probs under the same definition, or the PPO ratio is biased even at step 0.

Computed as ``z[token] - logsumexp(z)`` in float32, which avoids materialising the ``[N, V]``
log-softmax; ``chunk_size`` bounds the float32 upcast of the logits (see ``entropy``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _chunk(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def log_probs_from_logits(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """``logits [..., V]``, ``tokens [...]`` (int64) -> log-probs ``[...]`` in float32.

    Hazard: ``logits[:, t]`` predicts ``tokens[:, t + 1]``; shifting is the caller's job.
    ``temperature`` must be > 0 (greedy rollouts have no meaningful log-prob ratio).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        return _chunk(logits, tokens, temperature)
    flat_z = logits.reshape(-1, logits.shape[-1])
    flat_t = tokens.reshape(-1)
    parts = [_chunk(z, t, temperature) for z, t in zip(flat_z.split(chunk_size), flat_t.split(chunk_size))]
    out = torch.cat(parts) if parts else flat_z.new_zeros(0, dtype=torch.float32)
    return out.reshape(tokens.shape)
