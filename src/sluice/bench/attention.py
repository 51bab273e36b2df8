"""Timing of the Triton paged-attention kernels against SDPA on a contiguous cache (needs CUDA).

``python -m sluice.bench.attention`` prints one JSON line; ``--sweep`` adds timings of other tile
shapes and split counts (a few minutes of compiling) to choose the defaults in
``sluice.engine.attention.triton_backend``.

Each case is timed two ways, both with CUDA events, after warm-up, as the median of many samples:
``*_ms`` times one eager call (host launch cost included when it exceeds the GPU time: the paged decode
launches two kernels through Triton's Python launcher), ``*_graph_ms`` replays a CUDA graph of
``GRAPH_CALLS`` calls and divides, which is the GPU time alone and the figure a graph-captured decode step
sees. GB/s counts the bytes the attention must read and write at least (Q, K, V, output) once.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from sluice.engine.attention import AttentionMetadata
from sluice.engine.attention import triton_backend

GRAPH_CALLS = 20
QWEN_05B_HEADS = dict(heads_q=14, heads_kv=2, dim=64)


def time_ms(fn: Callable[[], object], samples: int = 100, warmup: int = 10) -> float:
    """Median over ``samples`` of one call, between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], object], samples: int = 30) -> float:
    """Median over ``samples`` replays of a graph holding ``GRAPH_CALLS`` calls, per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # compile and let the allocator settle outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    return time_ms(graph.replay, samples=samples, warmup=3) / GRAPH_CALLS


def shuffled_block_tables(num_seqs: int, pages_per_seq: int, generator: torch.Generator) -> torch.Tensor:
    """[S, pages_per_seq] int32: every page used once, in random order, so no two neighbours are adjacent."""
    return torch.randperm(num_seqs * pages_per_seq, generator=generator).view(num_seqs, -1).to(torch.int32)


def paged_copy(dense: torch.Tensor, tables: torch.Tensor, page_size: int) -> torch.Tensor:
    """Scatter a contiguous ``[S, L, H, D]`` cache into the pages that ``tables`` names."""
    num_seqs, length, heads, dim = dense.shape
    cache = torch.empty(tables.numel(), page_size, heads, dim, dtype=dense.dtype, device=dense.device)
    cache[tables.flatten().long()] = dense.reshape(-1, page_size, heads, dim)
    return cache


def _metadata(tables, q_lens: list[int], kv_lens: list[int], device) -> AttentionMetadata:
    cu = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=device),  # unused by attention
        block_tables=tables, seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=cu, max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens), is_decode=max(q_lens) == 1,
    )


def _random_case(num_seqs, q_len, kv_len, heads_q, heads_kv, dim, page_size=16, dtype=torch.bfloat16, seed=0,
                 device="cuda"):
    """Packed query [S * q_len, Hq, D], the paged K/V cache and its metadata, and SDPA's contiguous
    ``[S, H, L, D]`` q, k, v holding the same values."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_seqs, q_len, heads_q, dim, generator=gen).to(device, dtype)
    k = torch.randn(num_seqs, kv_len, heads_kv, dim, generator=gen).to(device, dtype)
    v = torch.randn(num_seqs, kv_len, heads_kv, dim, generator=gen).to(device, dtype)
    tables = shuffled_block_tables(num_seqs, kv_len // page_size, gen).to(device)
    k_cache, v_cache = paged_copy(k, tables, page_size), paged_copy(v, tables, page_size)
    meta = _metadata(tables, [q_len] * num_seqs, [kv_len] * num_seqs, device)
    dense = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q.reshape(num_seqs * q_len, heads_q, dim), k_cache, v_cache, meta, dense


def bench_decode(num_seqs, kv_len, heads_q=14, heads_kv=2, dim=64, sweep=False) -> dict:
    query, k_cache, v_cache, meta, (q, k, v) = _random_case(num_seqs, 1, kv_len, heads_q, heads_kv, dim)
    scale = dim**-0.5
    splits = triton_backend.choose_num_splits(meta, heads_kv, dim, query.device)
    workspace = triton_backend.DecodeWorkspace.allocate(num_seqs, heads_q, dim, 64, query.device)
    paged = lambda **kw: triton_backend.paged_attention(query, k_cache, v_cache, meta, scale,  # noqa: E731
                                                        workspace=workspace, **kw)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # noqa: E731
    diff = (paged().float() - sdpa().transpose(1, 2).reshape(query.shape).float()).abs().max().item()
    size = query.element_size()
    traffic = 2 * k.numel() * size + 2 * q.numel() * size
    result = {"num_splits": splits, "max_abs_diff_vs_sdpa": diff}
    result.update(_timings("triton", paged, traffic))
    result.update(_timings("sdpa", sdpa, traffic))
    if sweep:
        result["sweep_splits_graph_ms"] = {
            n: round(graph_time_ms(lambda: paged(num_splits=n)), 4) for n in (1, 2, 3, 4, 6, 8, 16)
        }
        result["sweep_config_graph_ms"] = _sweep(
            lambda config: paged(config=config, num_splits=splits),
            [triton_backend.KernelConfig(block_n=n, num_warps=w, num_stages=s)
             for n in (32, 64, 128) for w in (2, 4, 8) for s in (1, 3, 5)],
        )
    return result


def bench_prefill(num_seqs, q_len, prefix_len=0, heads_q=14, heads_kv=2, dim=64, sweep=False) -> dict:
    kv_len = prefix_len + q_len
    query, k_cache, v_cache, meta, (q, k, v) = _random_case(num_seqs, q_len, kv_len, heads_q, heads_kv, dim)
    scale = dim**-0.5
    paged = lambda **kw: triton_backend.paged_attention(query, k_cache, v_cache, meta, scale, **kw)  # noqa: E731
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device="cuda").tril(diagonal=prefix_len)
    mask = None if prefix_len == 0 else causal
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,  # noqa: E731
                                                  scale=scale, enable_gqa=True)
    diff = (paged().float() - sdpa().transpose(1, 2).reshape(query.shape).float()).abs().max().item()
    size = query.element_size()
    traffic = 2 * q.numel() * size + 2 * k.numel() * size
    visible_pairs = num_seqs * (q_len * prefix_len + q_len * (q_len + 1) // 2)
    flops = 4 * visible_pairs * heads_q * dim
    result = {"max_abs_diff_vs_sdpa": diff}
    for name, fn in (("triton", paged), ("sdpa", sdpa)):
        result.update(_timings(name, fn, traffic))
        result[f"{name}_tflops"] = round(flops / result[f"{name}_graph_ms"] / 1e9, 1)
    if sweep:
        result["sweep_config_graph_ms"] = _sweep(
            lambda config: paged(config=config),
            [triton_backend.KernelConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
             for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (3, 5)],
        )
    return result


def _timings(name: str, fn, traffic_bytes: int) -> dict:
    eager, graphed = time_ms(fn), graph_time_ms(fn)
    return {f"{name}_ms": round(eager, 4), f"{name}_graph_ms": round(graphed, 4),
            f"{name}_GBps": round(traffic_bytes / graphed / 1e6, 1)}


def _sweep(run_with: Callable[[triton_backend.KernelConfig], object], configs) -> dict:
    timings = {}
    for c in configs:
        key = f"m{c.block_m}_n{c.block_n}_w{c.num_warps}_s{c.num_stages}"
        try:
            timings[key] = round(graph_time_ms(lambda: run_with(c)), 4)
        except Exception as error:  # out of shared memory / registers for this shape: record and go on
            timings[key] = f"{type(error).__name__}: {str(error)[:80]}"
    return timings


def bench_attention(sweep: bool = False) -> dict:
    """Decode at 256 x 1024 and 64 x 2048 cached tokens (also 1 x 2048, 512 x 512, and Qwen3-0.6B's 16 / 8
    heads of dim 128), prefill at 16 x 512 and 16 x 128 after a 1024-token prefix; Qwen2.5-0.5B heads
    (14 / 2, dim 64) unless named, bf16, page size 16, pages in shuffled order."""
    torch.manual_seed(0)
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "decode_256x1024": bench_decode(256, 1024, **QWEN_05B_HEADS, sweep=sweep),
        "decode_64x2048": bench_decode(64, 2048, **QWEN_05B_HEADS, sweep=sweep),
        "decode_1x2048": bench_decode(1, 2048, **QWEN_05B_HEADS),
        "decode_512x512": bench_decode(512, 512, **QWEN_05B_HEADS),
        "decode_256x1024_dim128_16q8kv": bench_decode(256, 1024, heads_q=16, heads_kv=8, dim=128),
        "prefill_16x512": bench_prefill(16, 512, **QWEN_05B_HEADS, sweep=sweep),
        "extend_16x128_prefix1024": bench_prefill(16, 128, prefix_len=1024, **QWEN_05B_HEADS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes and split counts")
    print(json.dumps(bench_attention(sweep=parser.parse_args().sweep)))


if __name__ == "__main__":
    main()
