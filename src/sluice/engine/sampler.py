"""Token sampling from a batch of logits, each row with its own settings.

Logprob convention (the trainer computes the same): log_softmax(logits / temperature) of the sampled token,
taken BEFORE top-p / top-k / min-p truncation. Truncation only changes which tokens can be drawn. With
temperature 0 (greedy) the logprob is taken at temperature 1.
"""

from __future__ import annotations

import torch

from sluice.types import SamplingParams


def sample_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float -> (token ids [B], logprobs [B])."""
    logits = logits.float()
    temperatures = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
    log_probs = torch.log_softmax(logits / temperatures[:, None], dim=-1)
    filtered = _truncate(log_probs, params)
    probs = filtered.exp()
    # Greedy rows take the argmax and draw nothing, so evaluations never shift the random stream of sampling.
    tokens = log_probs.argmax(dim=-1)
    shared_rows = [i for i, (g, p) in enumerate(zip(generators, params)) if g is None and p.temperature > 0]
    if shared_rows:
        idx = torch.tensor(shared_rows, device=logits.device)
        tokens[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
    for i, (generator, p) in enumerate(zip(generators, params)):
        if generator is not None and p.temperature > 0:  # per-request seed: its own stream, batch-independent
            tokens[i] = torch.multinomial(probs[i], 1, generator=generator).squeeze(0)
    return tokens, log_probs.gather(1, tokens[:, None]).squeeze(1)


def _truncate(log_probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set to -inf the tokens that top-k, top-p or min-p exclude, row by row settings."""
    if all(p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0 for p in params):
        return log_probs
    vocab = log_probs.shape[-1]
    device = log_probs.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    sorted_lp, order = log_probs.sort(dim=-1, descending=True)
    sorted_p = sorted_lp.exp()
    rank = torch.arange(vocab, device=device)[None, :]
    # Keep a token while the mass strictly before it is < top_p, so the most likely token always survives.
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    drop = (rank >= top_k[:, None]) | (mass_before >= top_p[:, None])
    drop |= sorted_p < (min_p[:, None] * sorted_p[:, :1])
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    return torch.full_like(log_probs, float("-inf")).scatter(1, order, sorted_lp)
