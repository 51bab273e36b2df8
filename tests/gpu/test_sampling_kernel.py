"""Fused Triton sampling (marker `gpu`) against torch: greedy tokens, logprobs, the drawn distribution.

By default the kernel tests need CUDA. With ``SLUICE_TRITON_INTERPRET=1`` they run on CPU tensors through
Triton's interpreter instead (small sizes; set it before pytest starts so Triton sees ``TRITON_INTERPRET``).
On a machine with neither, ``test_kernels_in_interpreter`` runs this module again in a subprocess with
that variable set, so a CPU-only run still exercises the kernels.

The interpreter runs one Python program per (row, chunk), a few tens of milliseconds each, so distributions
are checked where one program makes many draws: the kernel's token must be exactly argmax(x / T + g) for
the noise g that ``gumbel_noise`` yields for the call's seed, and g itself must be Gumbel distributed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from sluice.engine.sampler import fusable, sample_tokens, sample_tokens_torch
from sluice.types import SamplingParams

INTERPRET = os.environ.get("SLUICE_TRITON_INTERPRET") == "1"
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, i.e. at import

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from sluice.engine import sampling_kernel  # noqa: E402
from sluice.engine.sampling_kernel import gumbel_noise  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TILE = 16 if INTERPRET else sampling_kernel.TILE
VOCAB = 3 * TILE + 5  # four tiles, the last one short
CHI2_999 = {4: 18.47, 7: 24.32}  # chi-square quantile 0.999 by degrees of freedom


@triton.jit
def _noise_kernel(keys_ptr, streams_ptr, out_ptr, vocab_size, TILE: tl.constexpr):
    row = tl.program_id(0)
    start = tl.program_id(1) * TILE
    index = start + tl.arange(0, TILE)
    noise = gumbel_noise(tl.load(keys_ptr + row), tl.load(streams_ptr + row), start, TILE)
    tl.store(out_ptr + row * vocab_size + index, noise, mask=index < vocab_size)


def noise(seed: torch.Tensor, num_rows: int, vocab_size: int, tile: int = TILE) -> torch.Tensor:
    """[num_rows, vocab_size] the Gumbel noise the sampling kernel adds to unseeded rows for the call key ``seed``."""
    return keyed_noise(seed.repeat(num_rows), torch.arange(num_rows, device=seed.device), vocab_size, tile)


def keyed_noise(keys: torch.Tensor, streams: torch.Tensor, vocab_size: int, tile: int = TILE) -> torch.Tensor:
    """[len(keys), vocab_size] the Gumbel noise of Philox keys ``keys`` [B] int64 at streams ``streams`` [B]."""
    out = torch.empty(len(keys), vocab_size, device=keys.device)
    _noise_kernel[(len(keys), triton.cdiv(vocab_size, tile))](keys, streams, out, vocab_size, TILE=tile)
    return out


def random_logits(num_rows: int, vocab_size: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_rows, vocab_size, generator=gen) * scale).to(DEVICE)


def reference_logprobs(logits: torch.Tensor, temperatures: list[float], tokens: torch.Tensor) -> torch.Tensor:
    scale = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=logits.device)
    return torch.log_softmax(logits.float() / scale[:, None], dim=-1).gather(1, tokens[:, None]).squeeze(1)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    expected = probs.cpu().double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


class TestKernels:
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                           reason="needs a CUDA device (test_kernels_in_interpreter runs these on CPU)"),
    ]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_greedy_is_argmax_with_logprob_at_temperature_one(self, dtype):
        logits = random_logits(3).to(dtype)
        logits[1, TILE + 2] = logits[1, 3 * TILE + 1] = logits[1].max() + 1  # a tie across chunks: the first
        tokens, logprobs = sampling_kernel.sample(logits, [0.0] * 3, tiles_per_chunk=1, tile=TILE)
        assert torch.equal(tokens, logits.float().argmax(dim=-1))
        assert tokens[1] == TILE + 2
        expected = reference_logprobs(logits, [1.0] * 3, tokens)
        torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
        _, torch_logprobs = sample_tokens_torch(logits, [SamplingParams(temperature=0.0)] * 3, [0] * 3)
        torch.testing.assert_close(logprobs, torch_logprobs, atol=1e-3 if dtype == torch.bfloat16 else 1e-5, rtol=0)

    @pytest.mark.parametrize("tiles_per_chunk", [1, 2])
    def test_token_is_the_gumbel_argmax_and_logprob_is_log_softmax(self, tiles_per_chunk):
        temperatures = [1.0, 0.7, 0.0, 1.3]  # per-row temperatures, one greedy row
        logits = random_logits(4, seed=1)
        torch.manual_seed(5)
        seed = sampling_kernel.draw_seed(torch.device(DEVICE))
        torch.manual_seed(5)
        tokens, logprobs = sampling_kernel.sample(logits, temperatures, tiles_per_chunk=tiles_per_chunk, tile=TILE)
        inv_temperature = 1.0 / torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=DEVICE)
        scores = logits * inv_temperature[:, None] + noise(seed, 4, VOCAB)
        scores[2] = logits[2]
        assert torch.equal(tokens, scores.argmax(dim=-1))
        torch.testing.assert_close(logprobs, reference_logprobs(logits, temperatures, tokens), atol=1e-5, rtol=0)

    def test_noise_is_gumbel(self):
        """One row of 2**17 draws: the empirical CDF against exp(-exp(-g)) (Kolmogorov-Smirnov), and the
        Gumbel-max draws over groups of 8 logits against their softmax; a second row draws other noise."""
        num_draws = 2**17
        torch.manual_seed(0)  # the statistical checks below hold for this seed, whatever ran before
        seed = sampling_kernel.draw_seed(torch.device(DEVICE))
        g = noise(seed, 2, num_draws, tile=1024 if DEVICE == "cuda" else num_draws // 4).double().cpu()
        assert torch.isfinite(g).all() and g.max() < 23.0
        ordered = g[0].sort().values
        model_cdf = torch.exp(-torch.exp(-ordered))
        ranks = torch.arange(1, num_draws + 1, dtype=torch.float64)
        ks = torch.maximum(ranks / num_draws - model_cdf, model_cdf - (ranks - 1) / num_draws).max()
        assert ks < 1.95 / math.sqrt(num_draws)  # the 0.001 critical value
        assert abs(torch.corrcoef(g)[0, 1]) < 0.02
        logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -4.0], dtype=torch.float64)
        draws = (logits + g[0].view(-1, 8)).argmax(dim=-1)
        assert chi_square(draws, torch.softmax(logits, dim=0)) < CHI2_999[7]

    def test_draws_follow_softmax_across_chunks(self):
        """Four likely tokens in four different tiles, the rest of the mass spread thin, temperature 0.8."""
        num_rows = 20000 if DEVICE == "cuda" else 12  # the interpreter: a smoke test, one program per row
        row = torch.full((VOCAB,), -4.0)
        likely = [1, TILE + 5, 2 * TILE + 9, 3 * TILE + 4]
        row[likely] = torch.tensor([1.5, 1.0, 0.5, 0.8])
        logits = row.to(DEVICE).repeat(num_rows, 1)
        torch.manual_seed(0)
        tokens, _ = sampling_kernel.sample(logits, [0.8] * num_rows, tiles_per_chunk=4 if INTERPRET else 1, tile=TILE)
        probs = torch.softmax(row / 0.8, dim=0)
        bucket = torch.full((VOCAB,), 4)
        bucket[likely] = torch.arange(4)
        bucket_probs = torch.zeros(5, dtype=torch.float64).index_add_(0, bucket, probs.double())
        assert chi_square(bucket[tokens.cpu()], bucket_probs) < CHI2_999[4]

    def test_masked_vocabulary_is_never_drawn(self):
        """Rows with most of the vocabulary at -inf, whole chunks included: no -inf token, no NaN."""
        logits = random_logits(6, seed=2)
        allowed = torch.zeros(6, VOCAB, dtype=torch.bool, device=DEVICE)
        allowed[0, :3] = True  # only the first chunk
        allowed[1, 2 * TILE : 2 * TILE + 2] = True  # only inside the third of four chunks
        allowed[2, -1] = True  # one token, in the short last tile
        allowed[3:, ::7] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
        temperatures = [1.0, 2.0, 0.5, 1.0, 0.0, 0.9]
        tokens, logprobs = sampling_kernel.sample(logits, temperatures, tiles_per_chunk=1, tile=TILE)
        assert allowed.gather(1, tokens[:, None]).all()
        assert torch.isfinite(logprobs).all() and (logprobs <= 0).all()
        torch.testing.assert_close(logprobs, reference_logprobs(logits, temperatures, tokens), atol=1e-5, rtol=0)
        assert tokens[2] == VOCAB - 1 and abs(logprobs[2]) < 1e-6

    def test_same_seed_same_tokens_and_consecutive_calls_differ(self):
        logits = torch.zeros(2, 4 * TILE, device=DEVICE)  # uniform: two equal draws have probability (4 * TILE)**-2
        draw = lambda: sampling_kernel.sample(logits, [1.0] * 2, tiles_per_chunk=4, tile=TILE)[0]  # noqa: E731
        torch.manual_seed(3)
        first, second = draw(), draw()
        torch.manual_seed(3)
        again = draw()
        assert torch.equal(first, again)
        assert not torch.equal(first, second)

    def test_seeded_row_is_the_gumbel_argmax_of_its_seed_and_position(self):
        """Seeded rows: key = seed (negative and above 2**63 taken as 64 bits), stream = position; an unseeded row
        beside them keeps the call's key with its row as stream."""
        logits = random_logits(3, seed=4)
        seeds, positions = [7, None, 2**64 - 3], [5, 9, 2**20]
        torch.manual_seed(2)
        call_key = sampling_kernel.draw_seed(torch.device(DEVICE))
        torch.manual_seed(2)
        tokens, _ = sampling_kernel.sample(logits, [1.0] * 3, seeds, positions, tiles_per_chunk=2, tile=TILE)
        keys = torch.tensor([7, int(call_key), -3], device=DEVICE)
        streams = torch.tensor([5, 1, 2**20], device=DEVICE)
        assert torch.equal(tokens, (logits + keyed_noise(keys, streams, VOCAB)).argmax(dim=-1))

    def test_same_seed_and_position_same_token_whatever_the_batch(self):
        """A seeded row's token depends on its logits, seed and position only: not on the other rows, its row
        index, the call, or the work split. Uniform logits: any noise change would change the token."""
        logits = torch.zeros(4, 4 * TILE, device=DEVICE)
        alone, _ = sampling_kernel.sample(logits[:1], [1.0], [11], [30], tiles_per_chunk=1, tile=TILE)
        torch.manual_seed(0)
        mixed, _ = sampling_kernel.sample(logits, [0.7, 1.0, 0.0, 1.0], [None, 5, 3, 11], [2, 30, 30, 30],
                                          tiles_per_chunk=4, tile=TILE)
        torch.manual_seed(1)
        again, _ = sampling_kernel.sample(logits[:2], [1.0, 1.0], [11, None], [30, 30], tiles_per_chunk=2, tile=TILE)
        assert mixed[3] == alone[0] and again[0] == alone[0]
        assert mixed[1] != alone[0]  # seed 5 at the same position: other noise (a tie has probability 1 / 64)
        later, _ = sampling_kernel.sample(logits[:1], [1.0], [11], [31], tiles_per_chunk=1, tile=TILE)
        assert later[0] != alone[0]  # the next position of the same seed: other noise

    def test_batches_of_seeded_and_greedy_rows_draw_no_shared_key(self):
        logits = random_logits(2)
        torch.manual_seed(9)
        sampling_kernel.sample(logits, [1.0, 0.0], [4, None], [3, 3], tiles_per_chunk=1, tile=TILE)
        after = torch.rand(3)
        torch.manual_seed(9)
        assert torch.equal(after, torch.rand(3))

    @pytest.mark.skipif(DEVICE != "cuda", reason="sample_tokens dispatches to the kernels on CUDA tensors only")
    def test_sample_tokens_dispatch(self):
        logits = random_logits(4, vocab_size=1000).to(torch.bfloat16)
        plain = [SamplingParams(temperature=t) for t in (1.0, 0.0, 0.6, 1.0)]
        seeded = [SamplingParams(temperature=1.0, seed=11), *plain[1:]]
        positions = [3, 4, 5, 6]
        for params in (plain, seeded):  # seeded rows take the fused kernels too
            torch.manual_seed(7)
            fused = sample_tokens(logits, params, positions)
            torch.manual_seed(7)
            expected = sampling_kernel.sample(logits, [p.temperature for p in params], [p.seed for p in params],
                                              positions)
            assert all(torch.equal(a, b) for a, b in zip(fused, expected))
        truncated = [SamplingParams(temperature=0.9, top_p=0.9), *plain[1:]]
        torch.manual_seed(7)
        got = sample_tokens(logits, truncated, positions)
        torch.manual_seed(7)
        want = sample_tokens_torch(logits, truncated, positions)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_fusable_only_without_truncation():
    assert fusable([SamplingParams(), SamplingParams(temperature=0.0)])
    assert fusable([SamplingParams(seed=3), SamplingParams()])  # seeded rows: Philox keyed by seed and position
    assert not fusable([SamplingParams(top_k=20)])
    assert not fusable([SamplingParams(top_p=0.95)])
    assert not fusable([SamplingParams(min_p=0.05)])
    assert not fusable([])


@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="the kernel tests run in this process")
def test_kernels_in_interpreter():
    """No CUDA: run this module's kernel tests on CPU through Triton's interpreter, in a fresh process since
    Triton reads TRITON_INTERPRET when the kernels (its own included) are decorated."""
    env = {**os.environ, "SLUICE_TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__ + "::TestKernels"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
