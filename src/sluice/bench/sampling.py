"""Timing of the fused Triton sampling kernel against the sampler's torch path (needs CUDA).

``python -m sluice.bench.sampling`` prints one JSON line: milliseconds per call at a few batch sizes, bf16
logits over Qwen's vocabulary, temperature 1.
"""

from __future__ import annotations

import functools
import json

import torch

from sluice.engine import sampler, sampling_kernel
from sluice.types import SamplingParams


def benchmark(batch_sizes: tuple[int, ...] = (64, 256, 1024), vocab_size: int = 151936, iterations: int = 50) -> dict:
    """Milliseconds per call of the fused kernels (shared stream, and every row seeded) and of the torch path,
    bf16 logits at temperature 1."""
    results = []
    for batch in batch_sizes:
        logits = (torch.randn(batch, vocab_size, device="cuda") * 3).to(torch.bfloat16)
        params = [SamplingParams(temperature=1.0)] * batch
        positions = list(range(batch))
        fused = functools.partial(sampling_kernel.sample, logits, [1.0] * batch)
        seeded = functools.partial(sampling_kernel.sample, logits, [1.0] * batch, list(range(batch)), positions)
        reference = functools.partial(sampler.sample_tokens_torch, logits, params, positions)
        results.append({"batch": batch, "fused_ms": _time_ms(fused, iterations),
                        "fused_seeded_ms": _time_ms(seeded, iterations), "torch_ms": _time_ms(reference, iterations)})
        results[-1]["speedup"] = round(results[-1]["torch_ms"] / results[-1]["fused_ms"], 2)
    return {"device": torch.cuda.get_device_name(), "vocab_size": vocab_size, "dtype": "bfloat16", "results": results}


def _time_ms(fn, iterations: int) -> float:
    for _ in range(3):  # compile and warm up
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iterations, 4)


if __name__ == "__main__":
    print(json.dumps(benchmark()))
