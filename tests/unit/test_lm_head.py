"""Chunked LM-head log-probs and entropy against the unchunked logits path: values, gradients, memory."""

from __future__ import annotations

import pytest
import torch

from sluice.algorithms import entropy_from_logits, log_probs_from_logits
from sluice.trainer.lm_head import default_chunk_size, token_logprobs_from_hidden


def make_inputs(num_tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype, seed: int = 0,
                device: str = "cpu", logit_scale: float = 3.0):
    """Random hidden states and head weight whose logits have std ~``logit_scale``, and random targets."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator, dtype=torch.float64) * logit_scale
    weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=torch.float64) / hidden_size**0.5
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    as_leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return as_leaf(hidden), as_leaf(weight), targets.to(device)


def reference_float64(hidden, weight, targets, temperature):
    """A second implementation in float64: log_softmax and -sum p log p on the dense logits."""
    logits = (hidden.double() @ weight.double().T) / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def reference_sluice(hidden, weight, targets, temperature):
    """The trainer's current definitions on dense logits (float32, sluice.algorithms)."""
    logits = hidden @ weight.T
    return (log_probs_from_logits(logits, targets, temperature),
            entropy_from_logits(logits.float() / temperature))


def mixed_loss(logprobs, entropy, seed: int = 1):
    """A loss that weights every token's log-prob and entropy differently (random upstream gradients)."""
    generator = torch.Generator().manual_seed(seed)
    w_lp = torch.randn(logprobs.shape, generator=generator, dtype=torch.float64).to(logprobs)
    w_h = torch.randn(logprobs.shape, generator=generator, dtype=torch.float64).to(logprobs)
    return (w_lp * logprobs).sum() + (w_h * entropy).sum()


def values_and_grads(fn, hidden, weight, targets, temperature):
    logprobs, entropy = fn(hidden, weight, targets, temperature)
    grad_hidden, grad_weight = torch.autograd.grad(mixed_loss(logprobs, entropy), (hidden, weight))
    return logprobs.detach(), entropy.detach(), grad_hidden, grad_weight


def chunked(chunk_size):
    return lambda h, w, t, temp: token_logprobs_from_hidden(h, w, t, temp, with_entropy=True, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, None])  # 1, N % chunk != 0, N, larger than N, default
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float64_matches_dense_reference(chunk_size, temperature):
    hidden, weight, targets = make_inputs(37 if chunk_size != 16 else 16, 12, 50, torch.float64)
    got = values_and_grads(chunked(chunk_size), hidden, weight, targets, temperature)
    want = values_and_grads(reference_float64, hidden, weight, targets, temperature)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    for name, a, b in zip(["logprobs", "entropy", "grad_hidden", "grad_weight"], got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_float32_matches_sluice_definitions(chunk_size):
    hidden, weight, targets = make_inputs(40, 16, 300, torch.float32, seed=3)
    got = values_and_grads(chunked(chunk_size), hidden, weight, targets, 1.3)
    want = values_and_grads(reference_sluice, hidden, weight, targets, 1.3)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, b in zip(["logprobs", "entropy", "grad_hidden", "grad_weight"], got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64():
    hidden, weight, targets = make_inputs(5, 3, 7, torch.float64, logit_scale=1.0)

    def both_outputs(h, w):
        return token_logprobs_from_hidden(h, w, targets, 0.8, with_entropy=True, chunk_size=2)

    def logprobs_only(h, w):
        return token_logprobs_from_hidden(h, w, targets, 0.8, with_entropy=False, chunk_size=3)[0]

    assert torch.autograd.gradcheck(both_outputs, (hidden, weight))
    assert torch.autograd.gradcheck(logprobs_only, (hidden, weight))


def test_entropy_only_and_logprobs_only_losses():
    """An output that takes no part in the loss gets no gradient (None upstream) and costs nothing wrong."""
    hidden, weight, targets = make_inputs(9, 4, 11, torch.float64)
    for pick in (0, 1):
        out = token_logprobs_from_hidden(hidden, weight, targets, 1.0, with_entropy=True, chunk_size=4)
        dense = reference_float64(hidden, weight, targets, 1.0)
        got = torch.autograd.grad(out[pick].sum(), (hidden, weight))
        want = torch.autograd.grad(dense[pick].sum(), (hidden, weight))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_without_entropy_and_frozen_inputs():
    hidden, weight, targets = make_inputs(10, 4, 13, torch.float64)
    logprobs, entropy = token_logprobs_from_hidden(hidden, weight.detach(), targets, 1.0, with_entropy=False,
                                                   chunk_size=3)
    assert entropy is None
    (grad_hidden,) = torch.autograd.grad(logprobs.sum(), hidden)
    want_lp, _ = reference_float64(hidden, weight.detach(), targets, 1.0)
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(want_lp.sum(), hidden)[0], atol=1e-10, rtol=0)
    frozen = token_logprobs_from_hidden(hidden.detach(), weight.detach(), targets, 1.0, with_entropy=True)
    assert frozen[0].grad_fn is None and frozen[1].grad_fn is None
    with torch.no_grad():
        no_grad = token_logprobs_from_hidden(hidden, weight, targets, 1.0, with_entropy=True)
    assert no_grad[0].grad_fn is None
    torch.testing.assert_close(no_grad[0], want_lp.detach(), atol=1e-10, rtol=0)


def test_zero_tokens():
    hidden, weight, targets = make_inputs(0, 4, 13, torch.float32)
    logprobs, entropy = token_logprobs_from_hidden(hidden, weight, targets, 1.0, with_entropy=True)
    assert logprobs.shape == (0,) and entropy.shape == (0,)
    grad_hidden, grad_weight = torch.autograd.grad(logprobs.sum() + entropy.sum(), (hidden, weight))
    assert grad_hidden.shape == (0, 4) and torch.all(grad_weight == 0)


def test_bf16_within_bf16_tolerance_of_float32():
    """bf16 logits round each entry to ~3 digits; the chunked path must stay within that of a float32 pass."""
    hidden, weight, targets = make_inputs(48, 32, 500, torch.bfloat16, seed=5, logit_scale=1.0)
    got = values_and_grads(chunked(10), hidden, weight, targets, 0.9)
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    want = values_and_grads(reference_sluice, hidden32, weight32, targets, 0.9)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], atol=5e-2, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=5e-2, rtol=0)
    for a, b in zip(got[2:], want[2:]):
        assert (a.float() - b).norm() <= 2e-2 * b.norm()


def test_invalid_arguments():
    hidden, weight, targets = make_inputs(3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_from_hidden(hidden, weight, targets, 0.0, with_entropy=False)
    with pytest.raises(ValueError, match="weight"):
        token_logprobs_from_hidden(hidden, weight[:, :3], targets, 1.0, with_entropy=False)
    with pytest.raises(ValueError, match="dtype"):
        token_logprobs_from_hidden(hidden, weight.double(), targets, 1.0, with_entropy=False)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_from_hidden(hidden, weight, targets[:2], 1.0, with_entropy=False)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_from_hidden(hidden, weight, targets, 1.0, with_entropy=False, chunk_size=0)


def test_default_chunk_size_bounds_float32_logits():
    assert default_chunk_size(151_936) == 441
    assert default_chunk_size(151_936) * 151_936 * 4 <= 256 * 2**20
    assert default_chunk_size(2**30) == 1


class LargestSaved(torch.autograd.graph.saved_tensors_hooks):
    """Records the element count of every tensor saved for backward while active."""

    def __init__(self):
        self.sizes: list[int] = []

        def pack(tensor):
            self.sizes.append(tensor.numel())
            return tensor

        super().__init__(pack, lambda tensor: tensor)


def test_nothing_of_size_tokens_times_vocab_is_saved():
    num_tokens, vocab_size = 4096, 50_000
    hidden, weight, targets = make_inputs(num_tokens, 4, vocab_size, torch.float32)
    saved = LargestSaved()
    with saved:
        token_logprobs_from_hidden(hidden, weight, targets, 0.7, with_entropy=True, chunk_size=1024)
    assert saved.sizes and max(saved.sizes) < num_tokens * vocab_size // 100
    # The hook does see what the dense path saves (a smaller case, the same check).
    small_h, small_w, small_t = make_inputs(64, 4, 1000, torch.float32)
    dense_saved = LargestSaved()
    with dense_saved:
        reference_sluice(small_h, small_w, small_t, 0.7)
    assert max(dense_saved.sizes) >= 64 * 1000


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_bf16_cuda_matches_float32_reference():
    """Qwen2.5-0.5B head shape (H 896, V 151,936) in bf16 on CUDA against a float32 dense pass."""
    hidden, weight, targets = make_inputs(4096, 896, 151_936, torch.bfloat16, device="cuda", logit_scale=1.0)
    got = values_and_grads(chunked(None), hidden, weight, targets, 0.8)
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    want = values_and_grads(reference_sluice, hidden32, weight32, targets, 0.8)
    torch.testing.assert_close(got[0], want[0], atol=5e-2, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=5e-2, rtol=0)
    for a, b in zip(got[2:], want[2:]):
        assert (a.float() - b).norm() <= 2e-2 * b.norm()


@pytest.mark.gpu
@needs_cuda
def test_cuda_peak_memory_well_under_dense_logits():
    """16k tokens x 151,936 vocabulary: the dense float32 logits alone would be 9.25 GiB."""
    num_tokens, vocab_size = 16_384, 151_936
    hidden, weight, targets = make_inputs(num_tokens, 896, vocab_size, torch.bfloat16, device="cuda",
                                          logit_scale=1.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logprobs, entropy = token_logprobs_from_hidden(hidden, weight, targets, 0.8, with_entropy=True)
    (logprobs.sum() - 0.01 * entropy.sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    dense_logits_bytes = num_tokens * vocab_size * 4
    assert peak < dense_logits_bytes / 4, f"peak {peak / 2**30:.2f} GiB"
    assert torch.isfinite(hidden.grad.float()).all() and torch.isfinite(weight.grad.float()).all()
