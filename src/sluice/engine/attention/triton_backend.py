"""Paged attention in Triton: a split-K decode kernel and a FlashAttention-2 style prefill/extend kernel.

Same contract as ``reference.paged_attention`` (layout and causal rule in the package docstring). Both kernels
read K/V straight from the pages: a tile of ``BLOCK_N`` cached positions is gathered row by row through the
block table (``page = block_table[pos // page_size]``, row ``pos % page_size``), so a tile may span several
pages and the page size only changes the address arithmetic, never the tile shape.

Decode (``meta.is_decode``). One program per (sequence, KV head, split): all ``Hq / Hkv`` query heads of
that KV head are the rows of one ``[BLOCK_H, D]`` query tile (padded to 16 for ``tl.dot``), so each K/V row
is read from memory once per KV head. Each sequence's tiles are spread evenly over ``num_splits`` programs
(flash-decoding); a second small kernel merges the splits by their log-sum-exp. With one split the first
kernel writes the output itself. The grid is ``(num_seqs, num_kv_heads, num_splits)``, with ``num_splits``
a Python int chosen from ``max_seqlen_k`` and the SM count, and nothing reads device values on the host, so
a decode step can be captured in a CUDA graph (pass a preallocated ``DecodeWorkspace`` or let
``torch.empty`` allocate inside the capture).

Prefill / extend. One program per (block of ``BLOCK_M`` query rows, sequence, query head), online softmax
over ``BLOCK_N`` key tiles. Key tiles wholly at or before the block's first query position need no mask and
run in a first loop; the diagonal tiles run in a second, masked loop that stops at the block's last query
position (tiles past the causal limit are never visited). Blocks past a sequence's ``q_len`` exit at once.

Numerics: scores, the running max/sum and the output accumulate in fp32; softmax runs in base 2 with
``scale * log2(e)`` folded into the scores. The probabilities are rounded to the K/V dtype for the P @ V
product (bf16: ~3 significant digits, as in FlashAttention). fp32 inputs use ``input_precision="ieee"``:
Triton's default for fp32 ``tl.dot`` is TF32 (10-bit mantissa) on Ampere and newer, about 1e-3 relative error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sluice.engine.attention import AttentionMetadata

_LOG2_E = 1.4426950408889634
_MAX_SPLITS = 64
_PROGRAMS_PER_SM = 4  # decode split target; tune with ``bench --sweep`` (sweep_splits_graph_ms)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch knobs of one kernel; the defaults below are starting points, tune with
    ``python -m sluice.bench.attention --sweep``."""

    block_n: int  # cached positions per K/V tile (power of two, >= 16)
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads
    block_m: int = 0  # prefill only: query rows per program (power of two, >= 16)


@dataclass
class DecodeWorkspace:
    """Split-K partial results; allocate once for the largest batch to keep a CUDA-graph capture alloc-free."""

    partial_out: torch.Tensor  # [max_seqs, num_q_heads, max_splits, head_dim] fp32: each split's normalised output
    partial_lse: torch.Tensor  # [max_seqs, num_q_heads, max_splits] fp32: each split's log2-sum-exp2 (-inf: empty)

    @classmethod
    def allocate(cls, max_seqs: int, num_q_heads: int, head_dim: int, max_splits: int, device) -> DecodeWorkspace:
        shape = (max_seqs, num_q_heads, max_splits)
        return cls(
            torch.empty(*shape, head_dim, dtype=torch.float32, device=device),
            torch.empty(shape, dtype=torch.float32, device=device),
        )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    num_splits: int | None = None,
    workspace: DecodeWorkspace | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """query [T, Hq, D] -> output [T, Hq, D] (same dtype as query).

    ``num_splits`` (decode only) overrides the split count; ``workspace`` supplies the split buffers;
    ``config`` overrides the kernel's tile shape (benchmarks and tuning).
    """
    _check_inputs(query, k_cache, v_cache)
    if meta.is_decode:
        splits = num_splits if num_splits is not None else choose_num_splits(
            meta, k_cache.shape[2], query.shape[2], query.device
        )
        return paged_decode(query, k_cache, v_cache, meta, scale, splits, workspace, config)
    return paged_prefill(query, k_cache, v_cache, meta, scale, config)


def supports_head_dim(head_dim: int) -> bool:
    """The kernels tile the head dim for ``tl.dot``: a power of two >= 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _check_inputs(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    heads_q, dim = query.shape[1], query.shape[2]
    page_size, heads_kv = k_cache.shape[1], k_cache.shape[2]
    if query.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"query dtype {query.dtype} is not supported (bf16, fp16, fp32)")
    if not supports_head_dim(dim):
        raise ValueError(f"head_dim {dim} must be a power of two >= 16 (tl.dot tiles)")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size {page_size} must be a power of two")
    if heads_q % heads_kv:
        raise ValueError(f"{heads_q} query heads are not a multiple of {heads_kv} KV heads")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != dim:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match head_dim {dim}")
    if query.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("query and the caches need a contiguous last dim, and K/V caches the same strides")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


# ---------------------------------------------------------------------------------------------------- decode


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # CPU / Triton interpreter: any small number; only the split count depends on it
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(meta: AttentionMetadata, num_kv_heads: int, head_dim: int, device: torch.device) -> int:
    """No split when (seqs x kv heads) already gives every SM two programs; otherwise enough splits for about
    ``_PROGRAMS_PER_SM`` each (a program keeps only one or two K/V tiles in flight, so several programs per SM
    are what hides memory latency), never more splits than tiles.

    Depends only on Python ints (``num_seqs``, ``max_seqlen_k``), so a captured decode graph replays with
    the split count it was captured with; pass the graph's largest ``max_seqlen_k`` when capturing.
    """
    programs = meta.num_seqs * num_kv_heads
    sms = _num_sms(device)
    if programs >= 2 * sms:
        return 1
    wanted = -(-_PROGRAMS_PER_SM * sms // max(programs, 1))
    useful = -(-meta.max_seqlen_k // _decode_config(head_dim).block_n)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def _decode_config(head_dim: int) -> KernelConfig:
    """Starting points from the sm_90 compile (not yet timed). The K/V addresses depend on a block-table load
    in the same iteration, so Triton's pipeliner needs num_stages >= 5 before it keeps the next tile's copies
    in flight during the current tile's math (at 2..4 it issues them only after the math: one buffer, no overlap)."""
    if head_dim <= 64:
        return KernelConfig(block_n=64, num_warps=4, num_stages=5)  # 37 KB shared, 80 registers
    return KernelConfig(block_n=32, num_warps=4, num_stages=5)  # 38 KB shared, 96 registers


def paged_decode(query, k_cache, v_cache, meta, scale, num_splits, workspace=None, config=None) -> torch.Tensor:
    """One query token per sequence; see the module docstring. Returns [S, Hq, D] in query's dtype."""
    num_seqs, heads_q, dim = query.shape
    heads_kv = k_cache.shape[2]
    group = heads_q // heads_kv
    config = config or _decode_config(dim)
    if num_seqs != meta.num_seqs:
        raise ValueError(f"decode needs one query token per sequence: {num_seqs} tokens, {meta.num_seqs} sequences")
    out = torch.empty_like(query)
    if num_splits > 1:
        if workspace is None:
            workspace = DecodeWorkspace.allocate(num_seqs, heads_q, dim, num_splits, query.device)
        needed = (num_seqs, heads_q, num_splits, dim)
        if any(have < need for have, need in zip(workspace.partial_out.shape, needed)):
            raise ValueError(f"workspace {tuple(workspace.partial_out.shape)} is smaller than {needed} "
                             "(seqs, q heads, splits, head_dim)")
        partial_out = workspace.partial_out[:num_seqs, :heads_q, :num_splits]
        partial_lse = workspace.partial_lse[:num_seqs, :heads_q, :num_splits]
    else:
        partial_out, partial_lse = out, out  # unused by the single-pass kernel
    lse_strides = partial_lse.stride() if num_splits > 1 else (0, 0, 0)
    tables = meta.block_tables
    _decode_kernel[(num_seqs, heads_kv, num_splits)](
        query, k_cache, v_cache, tables, meta.seq_lens, out, partial_out, partial_lse,
        scale * _LOG2_E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        lse_strides[0], lse_strides[1],
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, PAGE=k_cache.shape[1],
        BLOCK_N=config.block_n, NUM_SPLITS=num_splits, DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, heads_q)](
            partial_out, partial_lse, out,
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=dim,
            num_warps=4 if dim >= 128 else 2,
        )
    return out


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_k_page, stride_k_row, stride_k_head, stride_table,
    stride_po_seq, stride_po_head, stride_po_split,
    stride_pl_seq, stride_pl_head,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Splits cover whole tiles; a sequence shorter than NUM_SPLITS tiles leaves trailing splits empty.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    head_ok = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    q_rows = seq.to(tl.int64) * stride_q_tok + heads * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=head_ok[:, None], other=0.0)

    # Padded head rows (q = 0) see finite scores, so the running max never stays -inf once a tile ran.
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    for tile_start in range(start, end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        pos_ok = offs_n < end
        page = tl.load(table_row + offs_n // PAGE, mask=pos_ok, other=0)
        # int64: page * stride_k_page overflows int32 once the cache holds more than 2^31 elements.
        rows = page.to(tl.int64) * stride_k_page + (offs_n % PAGE) * stride_k_row + kv_head * stride_k_head
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=pos_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(pos_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=pos_ok[:, None], other=0.0).to(q.dtype)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (or a padding sequence with seq_len 0) has l_i = 0: write zeros, and lse = -inf.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_rows = seq.to(tl.int64) * stride_o_tok + heads * stride_o_head
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        po_rows = seq.to(tl.int64) * stride_po_seq + heads * stride_po_head + split * stride_po_split
        tl.store(part_out_ptr + po_rows[:, None] + offs_d[None, :], out, mask=head_ok[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        pl_rows = seq.to(tl.int64) * stride_pl_seq + heads * stride_pl_head + split
        tl.store(part_lse_ptr + pl_rows, lse, mask=head_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_po_seq, stride_po_head, stride_po_split, stride_pl_seq, stride_pl_head, stride_o_tok, stride_o_head,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """out = sum_s 2^(lse_s - max) * out_s / sum_s 2^(lse_s - max), one program per (sequence, query head)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    split_ok = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + seq * stride_pl_seq + head * stride_pl_head + offs_s, mask=split_ok,
                  other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # All splits empty (seq_len 0) would give 2^(-inf - -inf) = NaN: shift by 0 instead and get zero weights.
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    rows = seq * stride_po_seq + head * stride_po_head + offs_s * stride_po_split
    parts = tl.load(part_out_ptr + rows[:, None] + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_tok + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------- prefill


def _prefill_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Starting points from the sm_90 compile (not yet timed); num_stages 5 for the reason in _decode_config.
    fp32 (a test dtype: no tensor cores with "ieee") gets small tiles so its buffers fit in shared memory."""
    if dtype == torch.float32:
        return KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)
    # head_dim 64: 66 KB shared, 127 registers (2 programs per SM); head_dim 128: 132 KB, 184 registers (1).
    return KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=5)


def paged_prefill(query, k_cache, v_cache, meta, scale, config=None) -> torch.Tensor:
    """Packed varlen batch of new tokens over paged K/V (prefix + new); see the module docstring."""
    heads_q, dim = query.shape[1], query.shape[2]
    heads_kv = k_cache.shape[2]
    config = config or _prefill_config(dim, query.dtype)
    out = torch.empty_like(query)
    tables = meta.block_tables
    grid = (triton.cdiv(meta.max_seqlen_q, config.block_m), meta.num_seqs, heads_q)
    _prefill_kernel[grid](
        query, k_cache, v_cache, tables, meta.seq_lens, meta.cu_seqlens_q, out,
        scale * _LOG2_E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        GROUP=heads_q // heads_kv, HEAD_DIM=dim, PAGE=k_cache.shape[1],
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, q_pos, tile_start, kv_len, k_ptr, v_ptr, table_row, kv_head_offset,
    stride_k_page, stride_k_row, scale_log2,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys [tile_start, tile_start + BLOCK_N); MASKED adds the causal mask."""
    offs_n = tile_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        pos_ok = offs_n < kv_len
        page = tl.load(table_row + offs_n // PAGE, mask=pos_ok, other=0)
    else:
        page = tl.load(table_row + offs_n // PAGE)
    rows = page.to(tl.int64) * stride_k_page + (offs_n % PAGE) * stride_k_row + kv_head_offset
    if MASKED:
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=pos_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :])
    scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    # A row whose every key here is masked keeps m_new = m_i (finite: key 0 was in an earlier or this tile).
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=pos_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :])
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, seq_lens_ptr, cu_q_ptr, out_ptr,
    scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_k_page, stride_k_row, stride_k_head, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Last query blocks first: they see the most keys, so the long programs start early and the tail is short.
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if block * BLOCK_M >= q_len:
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    prefix = kv_len - q_len  # query row i sits at position prefix + i (end-aligned causal)

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q_pos = prefix + offs_m
    tokens = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    kv_head_offset = (head // GROUP) * stride_k_head
    first_pos = prefix + block * BLOCK_M
    # Tiles ending at or before first_pos are visible to every row of this block (and lie inside kv_len).
    unmasked_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    causal_end = prefix + tl.minimum((block + 1) * BLOCK_M, q_len)
    for tile_start in range(0, unmasked_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, q_pos, tile_start, kv_len, k_ptr, v_ptr, table_row, kv_head_offset,
            stride_k_page, stride_k_row, scale_log2, HEAD_DIM, PAGE, BLOCK_N, False, DOT_PRECISION,
        )
    for tile_start in range(unmasked_end, causal_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, q_pos, tile_start, kv_len, k_ptr, v_ptr, table_row, kv_head_offset,
            stride_k_page, stride_k_row, scale_log2, HEAD_DIM, PAGE, BLOCK_N, True, DOT_PRECISION,
        )
    # Every row saw key 0 (position <= its own), so l_i >= 1 here; padded rows (row_ok False) are not stored.
    out = acc / l_i[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
