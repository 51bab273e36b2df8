"""Triton paged attention (marker `gpu`) against ``reference.paged_attention`` on random paged batches.

By default these need CUDA. With ``SLUICE_TRITON_INTERPRET=1`` they run on CPU tensors through Triton's
interpreter instead (slow, small sizes; set it before pytest starts so Triton sees ``TRITON_INTERPRET``).

Every cache slot no sequence owns (free pages, the tail of each last page) holds NaN: a kernel that reads a
slot it should mask, or multiplies a masked probability by it, returns NaN and fails. The reference runs on
a copy with those slots zeroed, since SDPA itself turns 0 * NaN into NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

INTERPRET = os.environ.get("SLUICE_TRITON_INTERPRET") == "1"
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, i.e. at import

triton = pytest.importorskip("triton")

from sluice.engine.attention import AttentionMetadata  # noqa: E402
from sluice.engine.attention import reference  # noqa: E402
from sluice.engine.attention import triton_backend  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def interpreter_fixes():
    """Two bugs of Triton 3.6's interpreter, patched for this module only (the GPU path is untouched):
    bf16 ``tl.dot`` operands are multiplied as their raw uint16 bits (widen them to fp32 first), and a scalar
    used as a ``range`` bound is a 1-element array that NumPy >= 2.4 refuses to turn into an int."""
    if not INTERPRET:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original_dot = interpreter.InterpreterBuilder.create_dot
    original_patch_tensor = interpreter._patch_lang_tensor

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def patch_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
        patch.setattr(interpreter, "_patch_lang_tensor", patch_tensor)
        yield


@dataclass
class PagedBatch:
    query: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [pages, page_size, Hkv, D], NaN in unowned slots
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float

    def expected(self) -> torch.Tensor:
        """The reference in fp32 on the same (rounded) inputs, unowned slots zeroed."""
        k, v = self.k_cache.float().nan_to_num(0.0), self.v_cache.float().nan_to_num(0.0)
        return reference.paged_attention(self.query.float(), k, v, self.meta, self.scale)


def make_batch(q_lens, kv_lens, heads_q=14, heads_kv=2, dim=64, page_size=16, dtype=torch.float32,
               shared_prefix_pages=0, seed=0, query_stride_pad=0) -> PagedBatch:
    """Random paged batch: pages handed out in shuffled order; the first ``shared_prefix_pages`` of every
    sequence are the same physical pages (a shared prompt prefix); block-table padding points at page 0."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in kv_lens]
    owned = sum(max(p - shared_prefix_pages, 0) for p in pages_per_seq) + shared_prefix_pages
    num_pages = owned + 3  # a few free pages, left NaN
    order = torch.randperm(num_pages, generator=gen).tolist()
    shared, order = order[:shared_prefix_pages], order[shared_prefix_pages:]
    tables = torch.zeros(len(kv_lens), max(pages_per_seq), dtype=torch.int32)
    k_cache = torch.full((num_pages, page_size, heads_kv, dim), float("nan"))
    for seq, (kv_len, count) in enumerate(zip(kv_lens, pages_per_seq)):
        if count:
            assert shared_prefix_pages * page_size <= kv_len - q_lens[seq], "shared pages must be cached prefix"
        own = [order.pop() for _ in range(count - min(count, shared_prefix_pages))]
        tables[seq, :count] = torch.tensor((shared + own)[:count], dtype=torch.int32)
    v_cache = k_cache.clone()
    for seq, kv_len in enumerate(kv_lens):
        slots = tables[seq].long()[torch.arange(kv_len) // page_size] * page_size + torch.arange(kv_len) % page_size
        for cache in (k_cache, v_cache):
            flat = cache.view(-1, heads_kv, dim)
            flat[slots] = torch.randn(kv_len, heads_kv, dim, generator=gen)
    # Shared pages were written once per sequence above; the last write wins, which is fine (same page, one value).
    total = sum(q_lens)
    # Sliced after the move: Tensor.to(device) would make a strided view contiguous.
    query = torch.randn(total, heads_q + query_stride_pad, dim, generator=gen).to(DEVICE, dtype)[:, :heads_q]
    starts = torch.tensor([0] + q_lens).cumsum(0)
    slot_mapping = torch.cat([
        tables[s].long()[torch.arange(kv - q, kv) // page_size] * page_size + torch.arange(kv - q, kv) % page_size
        for s, (q, kv) in enumerate(zip(q_lens, kv_lens))
    ])
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(DEVICE), block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE),
        cu_seqlens_q=starts.to(torch.int32).to(DEVICE), max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens),
        is_decode=all(q == 1 for q in q_lens),
    )
    return PagedBatch(query, k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), meta, dim**-0.5)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype and actual.shape == expected.shape
    diff = (actual.float() - expected).abs()
    assert not diff.isnan().any(), "NaN in the output: a masked or unowned slot was read"
    if dtype == torch.float32:
        assert diff.max() < 2e-4, diff.max()
    else:
        assert diff.mean() < 1e-2 and diff.max() < 6e-2, (diff.mean(), diff.max())


GROUPS = [(2, 2), (4, 2), (14, 2)]  # GQA groups 1, 2, 7 (Hq, Hkv)
DTYPES = [torch.float32, torch.bfloat16]
DECODE_LENS = [1, 15, 16, 17, 63, 64, 65, 200, 129, 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_decode_matches_reference(heads, dim, dtype):
    batch = make_batch([1] * len(DECODE_LENS), DECODE_LENS, *heads, dim=dim, dtype=dtype)
    out = triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert_close(out, batch.expected(), dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_decode_splits_and_page_sizes(page_size, num_splits):
    """Splits beyond a short sequence's tile count stay empty; the merge must ignore them."""
    lens = [1, page_size - 1, page_size, page_size + 1, 3 * page_size + 5, 300]
    batch = make_batch([1] * len(lens), lens, 4, 2, dim=64, page_size=page_size, seed=page_size + num_splits)
    out = triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale,
                                         num_splits=num_splits)
    assert_close(out, batch.expected(), torch.float32)


def test_decode_shared_prefix_strided_query_and_workspace():
    lens = [70, 33, 100, 48]
    batch = make_batch([1] * 4, lens, 14, 2, dim=64, shared_prefix_pages=2, query_stride_pad=4, seed=5)
    assert not batch.query.is_contiguous()
    workspace = triton_backend.DecodeWorkspace.allocate(8, 14, 64, 6, DEVICE)  # larger than needed
    out = triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale,
                                         num_splits=4, workspace=workspace)
    assert_close(out, batch.expected(), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_empty_sequence_gives_zeros(num_splits):
    """A padding slot (seq_len 0, as in a CUDA-graph batch padded to its captured size) yields 0, not NaN."""
    batch = make_batch([1, 1], [20, 1], 4, 2, dim=64)
    batch.meta.seq_lens[1] = 0
    out = triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale,
                                         num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    batch.meta.seq_lens[1] = 1
    assert_close(out[:1], batch.expected()[:1], torch.float32)


PREFILL_CASES = {  # (q_lens, kv_lens): cached prefix = kv_len - q_len
    "no_prefix": ([1, 5, 130, 64], [1, 5, 130, 64]),
    "with_prefix": ([1, 17, 129, 3, 40], [50, 40, 300, 3, 167]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(case, heads, dim, dtype):
    q_lens, kv_lens = PREFILL_CASES[case]
    batch = make_batch(q_lens, kv_lens, *heads, dim=dim, dtype=dtype, seed=len(case))
    out = triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert_close(out, batch.expected(), dtype)


@pytest.mark.parametrize("page_size", [16, 32, 256])
@pytest.mark.parametrize("block", [(16, 16), (64, 32), (128, 64)], ids=str)
def test_prefill_shared_prefix_tiles_and_page_sizes(page_size, block):
    """Tiles smaller and larger than pages; BLOCK_M != BLOCK_N moves the diagonal inside a tile."""
    q_lens = [20, 1, 70, 33]
    kv_lens = [20 + 2 * page_size, 1 + 2 * page_size + 9, 70 + 2 * page_size, 33 + 2 * page_size + 40]
    batch = make_batch(q_lens, kv_lens, 4, 2, dim=64, page_size=page_size, shared_prefix_pages=2,
                       query_stride_pad=2, seed=page_size)
    config = triton_backend.KernelConfig(block_m=block[0], block_n=block[1], num_warps=4, num_stages=2)
    out = triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale,
                                         config=config)
    assert_close(out, batch.expected(), torch.float32)


def test_prefill_single_token_steps_match_decode_kernel():
    """A mixed step that is all single tokens through the prefill path agrees with the decode path."""
    lens = [1, 17, 90]
    batch = make_batch([1] * 3, lens, 14, 2, dim=64)
    decode = triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    batch.meta.is_decode = False
    prefill = triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert (decode - prefill).abs().max() < 2e-5


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need CUDA")
def test_decode_replays_in_a_cuda_graph():
    """Captured once at the largest length; replayed after the sequences grew, with the reference each time."""
    batch = make_batch([1] * 8, [100, 5, 300, 64, 1, 17, 250, 129], 14, 2, dim=64, dtype=torch.bfloat16)
    meta = batch.meta
    capture_meta = AttentionMetadata(meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
                                     1, 400, True)  # capture-time max length: the split count is fixed here
    workspace = triton_backend.DecodeWorkspace.allocate(8, 14, 64, 64, DEVICE)
    run = lambda: triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, capture_meta,  # noqa: E731
                                                 batch.scale, workspace=workspace)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for lens in ([100, 5, 300, 64, 1, 17, 250, 129], [90, 1, 2, 64, 1, 16, 250, 100]):
        meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        meta.max_seqlen_k = max(lens)
        assert_close(out, batch.expected(), torch.bfloat16)


def test_split_count_fills_the_gpu_only_when_the_batch_does_not():
    device = torch.device(DEVICE)
    sms = triton_backend._num_sms(device)
    big = make_batch([1] * 2, [40, 70]).meta
    big.seq_lens = torch.ones(2 * sms, dtype=torch.int32)  # only num_seqs and max_seqlen_k are read
    assert triton_backend.choose_num_splits(big, 1, 64, device) == 1
    small = make_batch([1], [1000], 4, 2).meta
    splits = triton_backend.choose_num_splits(small, 2, 64, device)
    assert 1 < splits <= -(-1000 // triton_backend._decode_config(64).block_n)


def test_rejects_what_the_kernels_cannot_do():
    batch = make_batch([1, 1], [5, 9], 4, 2, dim=64)
    with pytest.raises(ValueError, match="head_dim"):
        triton_backend.paged_attention(batch.query[..., :48], batch.k_cache[..., :48], batch.v_cache[..., :48],
                                       batch.meta, batch.scale)
    with pytest.raises(ValueError, match="workspace"):
        small = triton_backend.DecodeWorkspace.allocate(1, 4, 64, 2, DEVICE)
        triton_backend.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale,
                                       num_splits=2, workspace=small)
