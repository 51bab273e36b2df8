"""Token sampling from a batch of logits, each row with its own settings.

Logprob convention (the trainer computes the same): log_softmax(logits / temperature) of the sampled token,
taken BEFORE top-p / top-k / min-p truncation. Truncation only changes which tokens can be drawn. With
temperature 0 (greedy) the logprob is taken at temperature 1.

Seeded rows (``SamplingParams.seed``): the noise of a row is a pure function of (seed, position of the token
being drawn), never of a stream that advances with each draw. So a request draws the same noise whatever other
requests share its batches, and a request continued after an abort (a partial rollout, a weight update) from
its tokens so far draws, at each position, the noise it would have drawn uninterrupted. Rows without a seed
share the default generator of the logits' device (``torch.manual_seed`` makes those repeat too).
"""

from __future__ import annotations

import torch

from sluice.device import to_device
from sluice.types import SamplingParams


_TINY = torch.finfo(torch.float32).tiny
_MASK64 = 2**64 - 1


def logprob_temperature(params: SamplingParams) -> float:
    """The temperature logprobs are taken at (the convention above): a greedy row's at 1. Sampled tokens, top
    candidates and prompt logprobs all follow it, so the engine's numbers match what a trainer computes."""
    return params.temperature if params.temperature > 0 else 1.0


def sample_tokens(
    logits: torch.Tensor, params: list[SamplingParams], positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float, ``positions[i]`` the index in its sequence of the token row i draws (prompt tokens
    counted) -> (token ids [B], logprobs [B]).

    A token is drawn as argmax(p / E) with E ~ Exp(1) per vocabulary entry (the exponential race, equivalent to
    drawing from p). On CUDA, batches that ``fusable`` accepts take the fused Triton kernels of
    ``sampling_kernel`` (one read of the logits); the rest take ``sample_tokens_torch``.
    """
    if logits.is_cuda and fusable(params):
        from sluice.engine import sampling_kernel  # imports Triton, which CUDA builds of torch ship with

        return sampling_kernel.sample(logits, [p.temperature for p in params], [p.seed for p in params], positions)
    return sample_tokens_torch(logits, params, positions)


def fusable(params: list[SamplingParams]) -> bool:
    """Whether the fused kernels follow this batch's settings: no row truncates its distribution (top-k, top-p,
    min-p). Seeded rows are fused too (Philox keyed by the seed, the position in the counter); the kernels draw
    from the same distributions as the torch path, from other random numbers."""
    return bool(params) and not any(truncates(p) for p in params)


def truncates(p: SamplingParams) -> bool:
    """Whether top-k, top-p or min-p excludes tokens from this row's distribution."""
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0


def sample_tokens_torch(
    logits: torch.Tensor, params: list[SamplingParams], positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_tokens`` in torch ops, for every device and setting: two elementwise passes over a float copy of
    the logits and an argmax, no sort or cumulative sum unless a row truncates."""
    logits = logits.float()
    temperatures = [logprob_temperature(p) for p in params]
    if len(set(temperatures)) == 1:  # the usual RL batch: one scalar, no host-to-device copy
        log_probs = torch.log_softmax(logits / temperatures[0], dim=-1)
    else:
        scale = to_device(temperatures, torch.float32, logits.device)
        log_probs = torch.log_softmax(logits / scale[:, None], dim=-1)
    tokens = _draw(log_probs, params, positions)
    return tokens, log_probs.gather(1, tokens[:, None]).squeeze(1)


def _draw(log_probs: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:  # greedy rows draw no random numbers, so evaluations never shift the sampling stream
        return log_probs.argmax(dim=-1)
    filtered = _truncate(log_probs, params)
    shared = [i for i in sampled if params[i].seed is None]
    if len(shared) == len(params):  # every row samples from the shared stream: one pass over the batch
        noise = torch.empty_like(filtered).exponential_().clamp_min_(_TINY)  # E = 0 would make 0/0 = NaN win
        return (filtered.exp() / noise).argmax(dim=-1)
    tokens = log_probs.argmax(dim=-1)
    if shared:
        rows = to_device(shared, torch.int64, log_probs.device)
        noise = torch.empty((len(shared), log_probs.shape[1]), device=log_probs.device).exponential_().clamp_min_(_TINY)
        tokens[rows] = (filtered[rows].exp() / noise).argmax(dim=-1)
    seeded = [i for i in sampled if params[i].seed is not None]
    if seeded:
        noise = seeded_noise([params[i].seed for i in seeded], [positions[i] for i in seeded], log_probs.shape[1],
                             log_probs.device)
        rows = to_device(seeded, torch.int64, log_probs.device)
        tokens[rows] = (filtered[rows].exp() / noise).argmax(dim=-1)
    return tokens


def seeded_noise(seeds: list[int], positions: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(seeds), vocab_size] Exp(1) noise, row j a pure function of (seeds[j], positions[j]): one generator,
    re-seeded per row with ``noise_key`` (re-seeding costs far less than the draw itself)."""
    generator = torch.Generator(device=device)
    noise = torch.empty((len(seeds), vocab_size), device=device)
    for row, (seed, position) in enumerate(zip(seeds, positions, strict=True)):
        generator.manual_seed(noise_key(seed, position))
        noise[row].exponential_(generator=generator)
    return noise.clamp_min_(_TINY)


def noise_key(seed: int, position: int) -> int:
    """A 64-bit generator seed from (request seed, token position): SplitMix64's finaliser over the seed, then
    over the mixed seed plus the position, so that nearby seeds (a client's seed + i) and nearby positions land
    on unrelated keys."""
    return _mix64(_mix64(seed) + position)


def _mix64(value: int) -> int:
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _truncate(log_probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set to -inf the tokens that top-k, top-p or min-p exclude, row by row settings."""
    if not any(truncates(p) for p in params):
        return log_probs
    vocab = log_probs.shape[-1]
    device = log_probs.device
    top_k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.int64, device)
    top_p = to_device([p.top_p for p in params], torch.float32, device)
    min_p = to_device([p.min_p for p in params], torch.float32, device)
    sorted_lp, order = log_probs.sort(dim=-1, descending=True)
    sorted_p = sorted_lp.exp()
    rank = torch.arange(vocab, device=device)[None, :]
    # Keep a token while the mass strictly before it is < top_p, so the most likely token always survives.
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    drop = (rank >= top_k[:, None]) | (mass_before >= top_p[:, None])
    drop |= sorted_p < (min_p[:, None] * sorted_p[:, :1])
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    return torch.full_like(log_probs, float("-inf")).scatter(1, order, sorted_lp)
