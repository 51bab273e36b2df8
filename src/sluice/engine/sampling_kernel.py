"""Fused sampling in Triton: one pass over the logits draws a token per row and its logprob.

Same convention as ``sampler.sample_tokens``: logprob = log_softmax(logits / T) of the drawn token, greedy
rows (T = 0) take the argmax and a logprob at T = 1. No truncation (top-k / top-p / min-p): the sampler keeps
its torch path for those.

Kernel 1, grid (rows, chunks). Each program reads ``tiles_per_chunk`` tiles of ``TILE`` logits of one row
(bf16, fp16 or fp32, widened in registers: no fp32 copy of the batch), scales them by 1/T and keeps, for its
chunk: the running max and sum of exp (an online log-sum-exp) and the Gumbel-max winner, argmax(x/T + g)
with g = -log(E), E ~ Exp(1): the exponential race of the torch path written additively, so that chunks
compare without a shared reference max. Kernel 2, one program per row, merges the chunks: log-sum-exp of the
row, the chunk whose winner scores highest, and logprob = x[token] / T - lse from one reload of the logit.
Nothing is read back to the host, so a step stays free of syncs.

Randomness: Philox4x32-10 (``tl.randint4x``), a counter-based generator: the noise of an entry is a pure
function of (key, counter). The counter is (stream, group of four vocabulary entries): each Philox call feeds
four entries (one 32-bit word each), a quarter of the integer work of one call per entry. A row with a seed
(``SamplingParams.seed``) is keyed by its seed and its stream is the position of the token it draws, so its
noise depends on nothing else: not on the other rows of the batch, not on the call, not on an abort before
(see sampler.py). The other rows share a 64-bit key drawn per call from torch's default generator of the
logits' device (on the device, ``torch.randint``: no sync), their stream the row: ``torch.manual_seed`` makes
them repeat and consecutive calls use independent streams. A batch whose sampling rows all have seeds draws no
key, nor does a batch of only greedy rows (which computes no noise at all), so evaluations never shift the
shared stream (as on the torch path).

Numerical care. A 32-bit word w maps to eps = (w + 0.5) / 2**32 in (0, 1), never 0, clamped below 1 (fp32
rounds the top words up to 1.0), and E = -log1p(-eps): a series for small eps, where 1 - eps would round away
the small E that decide wins of unlikely tokens. E >= 1.2e-10 bounds g <= 23; tokens with p below ~1e-10
are drawn slightly less often than p (at most ~V * 2**-32 of mass in all). A chunk of only -inf logits
shifts its exp by 0 instead of its max (-inf - -inf would be NaN) and reports sum 0, max -inf, score -inf.
Ties in the greedy argmax resolve to the lowest index, as in torch.

``python -m sluice.bench.sampling`` times this against the torch path (one JSON line, CUDA only).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sluice.device import to_device

TILE = 2048  # logits per tile: one Philox call per four of them
_MAX_TILES_PER_CHUNK = 8
_PROGRAMS_PER_SM = 4  # chunk count target: enough programs to fill the GPU at small batches
_SEED_BOUND = 2**62


def sample(
    logits: torch.Tensor, temperatures: list[float], seeds: list[int | None] | None = None,
    positions: list[int] | None = None, tiles_per_chunk: int | None = None, tile: int = TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype), one temperature per row (0: greedy) -> (tokens [B] int64, logprobs [B] fp32).

    ``seeds`` (None entries: the shared stream) and ``positions`` (the index in its sequence of the token each
    row draws) key a row's noise; both or neither. ``tiles_per_chunk`` and ``tile`` (a power of two >= 4) fix
    the work split; the defaults suit a GPU.
    """
    num_rows, vocab_size = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    if tiles_per_chunk is None:
        tiles_per_chunk = _tiles_per_chunk(num_rows, vocab_size, tile, device)
    num_chunks = triton.cdiv(vocab_size, tile * tiles_per_chunk)
    per_row = len(set(temperatures)) > 1
    # pinned and asynchronous: a pageable copy would wait for the step before it (the engine overlaps steps)
    row_temperatures = to_device(temperatures, torch.float32, device) if per_row else logits  # unread unless per_row
    sampled = [t > 0 for t in temperatures]
    seeded = [s is not None and on for s, on in zip(seeds or [None] * num_rows, sampled, strict=True)]
    row_keys = _row_keys(seeds, positions, seeded, device) if any(seeded) else logits  # unread unless SEEDED_ROWS
    shared_key = draw_seed(device) if any(on and not own for on, own in zip(sampled, seeded)) else row_keys
    # Three allocations, not views of one: Triton specialises pointer arguments on 16-byte alignment, and views at
    # offsets of num_rows * num_chunks floats would compile a new kernel variant for some batch sizes mid-run.
    partial = [torch.empty(num_rows, num_chunks, dtype=torch.float32, device=device) for _ in range(3)]
    chunk_token = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=device)
    _chunk_kernel[(num_rows, num_chunks)](
        logits, logits.stride(0), vocab_size, row_temperatures, float(temperatures[0]), shared_key, row_keys,
        partial[0], partial[1], partial[2], chunk_token, num_chunks,
        PER_ROW_TEMPERATURE=per_row, SAMPLE=any(sampled), SEEDED_ROWS=any(seeded), TILE=tile,
        TILES_PER_CHUNK=tiles_per_chunk, num_warps=4,
    )
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)
    _merge_kernel[(num_rows,)](
        logits, logits.stride(0), row_temperatures, float(temperatures[0]),
        partial[0], partial[1], partial[2], chunk_token, num_chunks, tokens, logprobs,
        PER_ROW_TEMPERATURE=per_row, CHUNKS=triton.next_power_of_2(num_chunks), num_warps=1,
    )
    return tokens, logprobs


def draw_seed(device: torch.device) -> torch.Tensor:
    """The call's shared Philox key [1] int64, from torch's default generator of ``device``, drawn there (no sync)."""
    return torch.randint(_SEED_BOUND, (1,), device=device)


def _row_keys(seeds: list[int | None] | None, positions: list[int] | None, seeded: list[bool],
              device: torch.device) -> torch.Tensor:
    """[B, 3] int64 on ``device``, one copy: each row's key (its seed as 64 bits), its stream (the position)
    and whether it is seeded. Row-major, so the kernel needs no row count (an int argument Triton would
    specialise on: batches of 1 or of a multiple of 16 rows would compile other variants mid-run)."""
    if seeds is None or positions is None or len(positions) != len(seeds):
        raise ValueError("sampling_kernel.sample: seeded rows need one position per row")
    rows = [[_as_int64(s) if on else 0, p, int(on)] for s, p, on in zip(seeds, positions, seeded)]
    return to_device(rows, torch.int64, device)


def _as_int64(seed: int) -> int:
    """A seed's low 64 bits as a signed int64 (the kernel reads the bits back as Philox's two 32-bit key words)."""
    bits = seed & (2**64 - 1)
    return bits - 2**64 if bits >= 2**63 else bits


def _tiles_per_chunk(num_rows: int, vocab_size: int, tile: int, device: torch.device) -> int:
    """Longest chunks (fewer partials to merge) that still give every SM a few programs."""
    if device.type != "cuda":
        return 1
    target = _PROGRAMS_PER_SM * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    num_tiles = triton.cdiv(vocab_size, tile)
    tiles_per_chunk = 1
    while tiles_per_chunk < _MAX_TILES_PER_CHUNK and num_rows * triton.cdiv(num_tiles, 2 * tiles_per_chunk) >= target:
        tiles_per_chunk *= 2
    return tiles_per_chunk


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _chunk_kernel(
    logits_ptr, row_stride, vocab_size, temperatures_ptr, temperature, shared_key_ptr, row_keys_ptr,
    chunk_max_ptr, chunk_sum_ptr, chunk_score_ptr, chunk_token_ptr, num_chunks,
    PER_ROW_TEMPERATURE: tl.constexpr, SAMPLE: tl.constexpr, SEEDED_ROWS: tl.constexpr, TILE: tl.constexpr,
    TILES_PER_CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if SAMPLE:
        key, stream = noise_key(shared_key_ptr, row_keys_ptr, row, SEEDED_ROWS)
    if PER_ROW_TEMPERATURE:
        temperature = tl.load(temperatures_ptr + row)
    greedy = temperature <= 0
    inv_temperature = 1.0 / tl.where(greedy, 1.0, temperature)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    offsets = tl.arange(0, TILE)
    run_max = tl.full([], float("-inf"), tl.float32)
    run_sum = tl.full([], 0.0, tl.float32)
    best_score = tl.full([], float("-inf"), tl.float32)
    best_token = chunk * (TILES_PER_CHUNK * TILE)
    for t in range(TILES_PER_CHUNK):
        start = (chunk * TILES_PER_CHUNK + t) * TILE
        index = start + offsets
        x = tl.load(row_ptr + index, mask=index < vocab_size, other=float("-inf")).to(tl.float32)
        y = x * inv_temperature
        new_max = tl.maximum(run_max, tl.max(y, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: -inf - -inf would be NaN
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(y - shift), 0)
        run_max = new_max
        score = y
        if SAMPLE:
            gumbel = gumbel_noise(key, stream, start, TILE)
            score = tl.where(greedy, y, y + gumbel)
        tile_best, tile_arg = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best_score  # strict: an earlier tile keeps a tie, as torch.argmax does
        best_token = tl.where(better, start + tile_arg, best_token)
        best_score = tl.where(better, tile_best, best_score)
    slot = row * num_chunks + chunk
    tl.store(chunk_max_ptr + slot, run_max)
    tl.store(chunk_sum_ptr + slot, run_sum)
    tl.store(chunk_score_ptr + slot, best_score)
    tl.store(chunk_token_ptr + slot, best_token)


@triton.jit
def noise_key(shared_key_ptr, row_keys_ptr, row, SEEDED_ROWS: tl.constexpr):
    """(Philox key, stream) of a row: its seed and position if it has a seed, else the call's key and the row."""
    key = tl.load(shared_key_ptr)
    stream = row.to(tl.int64)
    if SEEDED_ROWS:
        entry = row_keys_ptr + 3 * row.to(tl.int64)
        seeded = tl.load(entry + 2) != 0
        key = tl.where(seeded, tl.load(entry), key)
        stream = tl.where(seeded, tl.load(entry + 1), stream)
    return key, stream


@triton.jit
def gumbel_noise(key, stream, start, TILE: tl.constexpr):
    """Gumbel noise g = -log(E), E ~ Exp(1), for vocabulary entries start .. start + TILE - 1 of a stream.

    Entry e takes word e % 4 of the Philox call at counter (stream, e // 4) under ``key``: the noise of an
    entry does not depend on the tile size (``start`` must be a multiple of 4). Streams below 2**32."""
    counter = (stream.to(tl.int64) << 32) | (start // 4 + tl.arange(0, TILE // 4))
    w0, w1, w2, w3 = tl.randint4x(key, counter)
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3)).to(tl.uint32, bitcast=True)
    eps = (words.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (w + 1/2) / 2**32
    eps = tl.minimum(eps, 0.99999994)  # the largest fp32 below 1: the top words round to 1.0
    # -log1p(-eps): the series keeps full precision where 1 - eps would round (its error ~eps**4 / 5 relative)
    series = eps * (1.0 + eps * (0.5 + eps * (0.33333334 + eps * 0.25)))
    exponential = tl.where(eps < 0.03125, series, -tl.log(1.0 - eps))
    return -tl.log(exponential)


@triton.jit
def _merge_kernel(
    logits_ptr, row_stride, temperatures_ptr, temperature,
    chunk_max_ptr, chunk_sum_ptr, chunk_score_ptr, chunk_token_ptr, num_chunks, tokens_ptr, logprobs_ptr,
    PER_ROW_TEMPERATURE: tl.constexpr, CHUNKS: tl.constexpr,
):
    row = tl.program_id(0)
    if PER_ROW_TEMPERATURE:
        temperature = tl.load(temperatures_ptr + row)
    temperature = tl.where(temperature <= 0, 1.0, temperature)
    chunks = tl.arange(0, CHUNKS)
    valid = chunks < num_chunks
    slots = row * num_chunks + chunks
    chunk_max = tl.load(chunk_max_ptr + slots, mask=valid, other=float("-inf"))
    chunk_sum = tl.load(chunk_sum_ptr + slots, mask=valid, other=0.0)
    chunk_score = tl.load(chunk_score_ptr + slots, mask=valid, other=float("-inf"))
    chunk_token = tl.load(chunk_token_ptr + slots, mask=valid, other=0)
    row_max = tl.max(chunk_max, 0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    log_sum_exp = shift + tl.log(tl.sum(chunk_sum * tl.exp(chunk_max - shift), 0))
    _, winner = tl.max(chunk_score, 0, return_indices=True, return_indices_tie_break_left=True)
    token = tl.sum(tl.where(chunks == winner, chunk_token, 0), 0)
    logit = tl.load(logits_ptr + row.to(tl.int64) * row_stride + token).to(tl.float32)
    # an IEEE division, as torch's logits / T: the token's own logprob is not averaged like the sum above
    tl.store(logprobs_ptr + row, tl.math.div_rn(logit, temperature) - log_sum_exp)
    tl.store(tokens_ptr + row, token.to(tl.int64))
