"""`sluice bench rollout`: output tokens per second of the engine on the standard offline workload.

Workload (docs/benchmarks.md, section 1): N prompts of random token ids, prompt and output lengths drawn
uniformly from [min, max], EOS ignored, temperature 0.6, random weights of a named model shape. The figure is
output tokens / wall time, prefill included, warm-up excluded. ``--compare-hf`` runs transformers' ``generate``
on the same prompts in the same process; its batches are left-padded and decode to the longest requested output
of the batch, and its figure counts only the requested output tokens, so both figures measure the same work.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from sluice.bench.run_info import device_name, git_commit, sync_device
from sluice.bench.shapes import SHAPES, parameter_bytes, shape_config, write_random_checkpoint
from sluice.config import EngineConfig
from sluice.engine.clients.protocol import GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.types import SamplingParams

# Peak HBM bandwidth used for the decode roofline (H100 SXM, HBM3).
H100_HBM_BYTES_PER_S = 3.35e12


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sluice bench rollout", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--model-shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--n-samples-per-prompt", type=int, default=1, help="Samples sharing each prompt (RL shape: 8).")
    parser.add_argument("--min-len", type=int, default=100, help="Shortest prompt and output length.")
    parser.add_argument("--max-len", type=int, default=1024, help="Longest prompt and output length.")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--return-logprob", action="store_true")
    parser.add_argument("--compare-hf", action="store_true", help="Also time transformers generate on the same prompts.")
    parser.add_argument("--hf-batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-running-requests", type=int, default=None, help="Default: 256 on CPU, 1024 on GPU.")
    parser.add_argument("--mem-fraction-static", type=float, default=0.8)
    parser.add_argument("--disable-cuda-graph", action="store_true")
    parser.add_argument("--disable-overlap-schedule", action="store_true",
                        help="Read each step's tokens back before launching the next (the engine's former loop).")
    parser.add_argument("--disable-radix-cache", action="store_true")
    parser.add_argument("--cuda-graph-max-bs", type=int, default=1024)
    return parser.parse_args(argv)


def make_workload(args, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """Prompts (one per sequence; the samples of a prompt share it) and each sequence's output length."""
    rng = random.Random(args.seed)
    prompts, output_lens = [], []
    for _ in range(args.num_prompts):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(args.min_len, args.max_len))]
        for _ in range(args.n_samples_per_prompt):
            prompts.append(prompt)
            output_lens.append(rng.randint(args.min_len, args.max_len))
    return prompts, output_lens


def run_engine(engine: LocalEngine, prompts, output_lens, temperature: float, return_logprob: bool) -> list:
    results: list = [None] * len(prompts)
    remaining = [len(prompts)]
    done = threading.Event()
    lock = threading.Lock()

    def on_done(index, result):
        results[index] = result
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    for index, (prompt, length) in enumerate(zip(prompts, output_lens)):
        params = SamplingParams(temperature=temperature, max_new_tokens=length, ignore_eos=True)
        engine.submit(GenerateRequest(prompt, params, return_logprob=return_logprob),
                      lambda result, index=index: on_done(index, result))
    done.wait()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    return results


def run_hf(path: Path, prompts, output_lens, temperature: float, batch_size: int, device, dtype) -> float:
    """Seconds for transformers generate over all prompts (left-padded batches)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    sync_device(device)
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        new = max(output_lens[i] for i in rows)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                           pad_token_id=0, eos_token_id=None)
    sync_device(device)
    return time.perf_counter() - started


def bench_rollout(argv: list[str]) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = shape_config(args.model_shape)
    prompts, output_lens = make_workload(args, config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(args.model_shape, tmp, dtype, str(device), args.seed)
        running = args.max_running_requests or (1024 if device.type == "cuda" else 256)
        engine_config = EngineConfig(device=str(device), skip_tokenizer_init=True, max_running_requests=running,
                                     mem_fraction_static=args.mem_fraction_static,
                                     disable_cuda_graph=args.disable_cuda_graph,
                                     disable_overlap_schedule=args.disable_overlap_schedule,
                                     disable_radix_cache=args.disable_radix_cache,
                                     cuda_graph_max_bs=min(running, args.cuda_graph_max_bs))
        started = time.perf_counter()
        engine = LocalEngine(str(path), engine_config)
        startup = time.perf_counter() - started
        memory = _memory_report(device, engine)
        print(f"engine ready in {startup:.1f} s: {memory}", file=sys.stderr, flush=True)
        try:
            # Warm-up: the workload's first 64 prompts with outputs cut to 64 tokens, so prefill and decode run at
            # the workload's shapes before the clock starts (first uses compile kernels).
            warm = min(64, len(prompts))
            run_engine(engine, prompts[:warm], [min(n, 64) for n in output_lens[:warm]], args.temperature,
                       args.return_logprob)
            engine.flush_cache()
            engine.stats.__init__()
            sync_device(device)
            started = time.perf_counter()
            results = run_engine(engine, prompts, output_lens, args.temperature, args.return_logprob)
            wall = time.perf_counter() - started
            stats, kv_tokens = engine.stats, engine.kv_capacity_tokens
            preemptions = engine.scheduler.num_preemptions
            if device.type == "cuda":
                memory["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        finally:
            engine.shutdown()
        output_tokens = sum(len(r.output_ids) for r in results)
        report = {
            "bench": "rollout", "model_shape": args.model_shape, "device": device_name(device),
            "dtype": str(dtype).replace("torch.", ""), "commit": git_commit(),
            "workload": {"num_prompts": args.num_prompts, "n_samples_per_prompt": args.n_samples_per_prompt,
                         "len_range": [args.min_len, args.max_len], "temperature": args.temperature,
                         "return_logprob": args.return_logprob, "ignore_eos": True},
            "output_tokens": output_tokens, "prompt_tokens": sum(map(len, prompts)),
            "cached_prompt_tokens": sum(r.cached_tokens for r in results),
            "wall_s": round(wall, 3), "output_tok_s": round(output_tokens / wall, 1),
            "engine_startup_s": round(startup, 2), "kv_capacity_tokens": kv_tokens,
            "max_running_requests": running, "overlap_schedule": not args.disable_overlap_schedule,
            "preemptions": preemptions, "memory": memory,
            "decode_steps": stats.num_decode_steps,
            "mean_decode_batch": round(stats.num_decode_tokens / max(1, stats.num_decode_steps), 1),
            "step_s": {"total": round(stats.forward_seconds, 3), "launch": round(stats.launch_seconds, 3),
                       "sample_and_sync": round(stats.sync_seconds, 3), "bookkeeping": round(stats.bookkeeping_seconds, 3)},
        }
        report.update(_roofline(config, stats, prompts, output_lens, dtype))
        if args.compare_hf:
            hf_seconds = run_hf(path, prompts, output_lens, args.temperature, args.hf_batch_size, device, dtype)
            report["hf_generate_tok_s"] = round(output_tokens / hf_seconds, 1)
            report["speedup_vs_hf"] = round(hf_seconds / wall, 2)
    return report


def _roofline(config, stats, prompts, output_lens, dtype) -> dict:
    """Decode step time measured vs the HBM roofline at the mean decode batch and mean context."""
    if not stats.num_decode_steps:
        return {}
    batch = stats.num_decode_tokens / stats.num_decode_steps
    context = sum(len(p) + n / 2 for p, n in zip(prompts, output_lens)) / len(prompts)
    element = torch.finfo(dtype).bits // 8
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
    step_bytes = parameter_bytes(config, element) + batch * context * kv_bytes_per_token
    return {"decode_step_ms": round(1e3 * stats.decode_seconds / stats.num_decode_steps, 3),
            "decode_step_ms_roofline": round(1e3 * step_bytes / H100_HBM_BYTES_PER_S, 3),
            "roofline_batch": round(batch, 1), "roofline_context": round(context, 1)}


def _memory_report(device: torch.device, engine: LocalEngine) -> dict:
    pool = engine.pool
    report = {"kv_pool_gib": round(pool.num_pages * pool.shape.bytes_per_page / 2**30, 2)}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        report.update(allocated_gib=round(torch.cuda.memory_allocated(device) / 2**30, 2),
                      reserved_gib=round(torch.cuda.memory_reserved(device) / 2**30, 2),
                      device_used_gib=round((total - free) / 2**30, 2), device_total_gib=round(total / 2**30, 2))
    return report




def main(argv: list[str]) -> int:
    print(json.dumps(bench_rollout(argv)))
    return 0
