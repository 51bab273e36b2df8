"""Packed causal attention against a dense block-diagonal softmax reference and against one call per sequence."""

from __future__ import annotations

import pytest
import torch

from sluice.models.packed_attention import attention_backend, cu_seqlens_from_lengths, packed_causal_attention

LENGTHS = [1, 6, 1, 11, 6, 0, 3, 6]  # single tokens, repeated lengths (one batched call), an empty sequence


def dense_reference(q, k, v, cu_seqlens, scale):
    """Plain softmax attention under a full ``[T, T]`` block-diagonal causal mask (test-only: O(T^2) memory)."""
    num_tokens = q.shape[0]
    sequence = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff().long().cpu())
    sequence = sequence.to(q.device)
    position = torch.arange(num_tokens, device=q.device)
    allowed = (sequence[:, None] == sequence[None, :]) & (position[None, :] <= position[:, None])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hts,shd->thd", weights, v)


def make_qkv(lengths, num_q_heads, num_kv_heads, head_dim, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    leaf = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()  # noqa: E731
    q = leaf(num_tokens, num_q_heads, head_dim)
    k = leaf(num_tokens, num_kv_heads, head_dim)
    v = leaf(num_tokens, num_kv_heads, head_dim)
    return q, k, v, cu_seqlens_from_lengths(lengths, device=device)


def output_and_grads(attention, q, k, v, cu_seqlens, scale, seed=1):
    out = attention(q, k, v, cu_seqlens, scale)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return (out.detach(), *torch.autograd.grad((out * upstream).sum(), (q, k, v)))


def packed(q, k, v, cu_seqlens, scale):
    return packed_causal_attention(q, k, v, cu_seqlens, int(cu_seqlens.diff().max()), scale)


def test_cu_seqlens_layout():
    cu = cu_seqlens_from_lengths([3, 1, 0, 2])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 4, 6]
    assert cu_seqlens_from_lengths(torch.tensor([], dtype=torch.long)).tolist() == [0]
    with pytest.raises(ValueError, match="non-negative"):
        cu_seqlens_from_lengths([2, -1])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(2, 2), (4, 2), (14, 2)])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_matches_dense_block_diagonal_reference(dtype, tol, num_q_heads, num_kv_heads, head_dim):
    q, k, v, cu = make_qkv(LENGTHS, num_q_heads, num_kv_heads, head_dim, dtype, seed=head_dim + num_q_heads)
    scale = head_dim**-0.5 * 1.3  # not the default scale, so a dropped argument shows
    got = output_and_grads(packed, q, k, v, cu, scale)
    want = output_and_grads(dense_reference, q, k, v, cu, scale)
    for name, a, b in zip(["out", "grad_q", "grad_k", "grad_v"], got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_each_sequence_alone_gives_the_same_outputs():
    """Nothing leaks across sequences: the packed output of a sequence equals attention over it alone."""
    q, k, v, cu = make_qkv(LENGTHS, 4, 2, 8, torch.float64, seed=7)
    out = packed_causal_attention(q, k, v, cu, max(LENGTHS), 0.3)
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        alone = packed_causal_attention(q[start:end], k[start:end], v[start:end],
                                        cu_seqlens_from_lengths([end - start]), end - start, 0.3)
        torch.testing.assert_close(out[start:end], alone, atol=1e-12, rtol=0)


def test_host_offsets_give_the_same_output_and_are_checked_like_cu_seqlens():
    q, k, v, cu = make_qkv(LENGTHS, 4, 2, 8, torch.float64, seed=3)
    out = packed_causal_attention(q, k, v, cu, max(LENGTHS), 0.3, backend="sdpa")
    with_offsets = packed_causal_attention(q, k, v, cu, max(LENGTHS), 0.3, backend="sdpa", offsets=tuple(cu.tolist()))
    torch.testing.assert_close(with_offsets, out, atol=0, rtol=0)
    short = tuple(cu.tolist()[:-1])  # ends before the last token
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        packed_causal_attention(q, k, v, cu, max(LENGTHS), 0.3, backend="sdpa", offsets=short)


def test_first_token_of_each_sequence_reads_only_its_own_value():
    q, k, v, cu = make_qkv([3, 4, 1], 2, 1, 8, torch.float64)
    out = packed_causal_attention(q, k, v, cu, 4, 0.5)
    for start in cu.tolist()[:-1]:
        torch.testing.assert_close(out[start], v[start].expand(2, 8), atol=1e-12, rtol=0)


def test_no_tokens_and_invalid_arguments():
    q, k, v, cu = make_qkv([], 2, 1, 8, torch.float32)
    assert packed_causal_attention(q, k, v, cu, 0, 0.5).shape == (0, 2, 8)
    q, k, v, cu = make_qkv([2, 3], 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        packed_causal_attention(q, k, v, cu, 3, 0.5)
    q, k, v, cu = make_qkv([2, 3], 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_causal_attention(q, k, v, cu_seqlens_from_lengths([2, 2]), 2, 0.5)
    with pytest.raises(ValueError, match="backend"):
        packed_causal_attention(q, k, v, cu, 3, 0.5, backend="flash")
    assert attention_backend(q) == "sdpa"


def varlen_attn_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1)):
    """Stands in for torch 2.11's ``varlen_attn`` signature (no ``enable_gqa``) on CPU, computing densely."""
    assert window_size == (-1, 0) and query.shape[1] == key.shape[1] and max_q == max_k == 11
    return dense_reference(query, key, value, cu_seq_q, scale)


def varlen_attn_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """Stands in for an older signature: causal as a flag, no ``scale`` (the kernel uses ``D ** -0.5``)."""
    assert is_causal and query.shape[1] == key.shape[1]
    return dense_reference(query, key, value, cu_seq_q, query.shape[-1] ** -0.5)


@pytest.mark.parametrize("fake_varlen_attn", [varlen_attn_torch_2_11, varlen_attn_torch_2_10])
def test_varlen_arguments_follow_the_installed_signature(monkeypatch, fake_varlen_attn):
    """The varlen path repeats KV heads where ``enable_gqa`` is missing and pre-scales q where ``scale`` is."""
    import torch.nn.attention.varlen

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", fake_varlen_attn)
    q, k, v, cu = make_qkv(LENGTHS, 14, 2, 8, torch.float64, seed=11)
    varlen = lambda *args: packed_causal_attention(*args[:4], max(LENGTHS), args[4], backend="varlen")  # noqa: E731
    got = output_and_grads(varlen, q, k, v, cu, 0.9)
    want = output_and_grads(dense_reference, q, k, v, cu, 0.9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QWEN_LENGTHS = [1, 37, 128, 1, 300, 64, 64, 2]


@pytest.mark.gpu
@needs_cuda
def test_bf16_cuda_varlen_matches_float32_reference():
    """Qwen2.5-0.5B attention (14 query heads, 2 KV heads, head dim 64): bf16 varlen vs a float32 dense pass."""
    q, k, v, cu = make_qkv(QWEN_LENGTHS, 14, 2, 64, torch.bfloat16, seed=3, device="cuda")
    assert attention_backend(q) == "varlen"
    got = output_and_grads(packed, q, k, v, cu, 64**-0.5)
    as_float32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = output_and_grads(dense_reference, *as_float32, cu, 64**-0.5)
    torch.testing.assert_close(got[0].float(), want[0], atol=2e-2, rtol=2e-2)
    for name, a, b in zip(["grad_q", "grad_k", "grad_v"], got[1:], want[1:]):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).norm() <= 2e-2 * b.norm(), name


@pytest.mark.gpu
@needs_cuda
def test_float32_cuda_uses_sdpa_and_matches_reference():
    q, k, v, cu = make_qkv(QWEN_LENGTHS, 14, 2, 64, torch.float32, seed=4, device="cuda")
    assert attention_backend(q) == "sdpa"
    got = output_and_grads(packed, q, k, v, cu, 64**-0.5)
    want = output_and_grads(dense_reference, q, k, v, cu, 64**-0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # TF32 may be on for the matmuls
