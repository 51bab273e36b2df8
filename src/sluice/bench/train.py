"""`sluice bench train`: tokens per second and MFU of the trainer on an RL-shaped batch.

Workload (docs/benchmarks.md): ``--num-prompts`` prompts x ``--n-samples-per-prompt`` responses of random token
ids; each prompt's length and each response's length drawn uniformly from [--min-len, --max-len] (as in
`sluice bench rollout`); random advantages; random weights of a named model shape. One step is
``TorchTrainer.train_step`` on the whole batch: forward, backward and one AdamW step, accumulated over the
micro-batches the trainer forms (packed by token budget by default); with ``--optimizer-cpu-offload`` the step
runs on the host and ``optimizer_s`` counts its AdamW calls, not the copies between them. ``--with-old-logprobs`` also times the
no-grad ``compute_logprobs`` pass that precedes a step in an RL loop. Warm-up steps are not timed.

Figures count real tokens only (prompt + response of every sequence, never padding), and MFU counts the FLOPs of
those tokens (see flops.py). ``--compare-hf`` then trains a plain Hugging Face loop (hf_train.py) on the same
sequences in the same process; ``speedup_vs_hf`` compares the two ``train_step`` figures (the old-logprob pass
is not part of it).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from statistics import mean

import torch

from sluice.bench.flops import FORWARD_MFU_FORMULA, MFU_FORMULA, matmul_parameters, mfu, train_flops
from sluice.bench.hf_train import time_hf_training
from sluice.bench.run_info import device_name, git_commit
from sluice.bench.shapes import SHAPES, shape_config, write_random_checkpoint
from sluice.bench.train_report import print_table
from sluice.bench.train_timing import PhaseOutOfMemory, TrainTimes, time_steps
from sluice.config import AlgorithmConfig, TrainConfig
from sluice.device import resolve_device
from sluice.trainer.batching import collate, micro_batch_rows
from sluice.types import Sample, TrainBatch

H100_DENSE_BF16_TFLOPS = 989.0
DEFAULT_MIN_LEN = 100


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sluice bench train", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--model-shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--n-samples-per-prompt", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=None,
                        help=f"Shortest prompt and response length; default {DEFAULT_MIN_LEN} (or --max-len if smaller).")
    parser.add_argument("--max-len", type=int, default=1024, help="Longest prompt and response length.")
    parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps.")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-dtype", default=None, choices=("float32", "bfloat16"),
                        help="Default: bfloat16 on GPU, float32 on CPU.")
    parser.add_argument("--train-model-impl", default="auto", choices=("auto", "native", "hf"))
    parser.add_argument("--use-dynamic-batch-size", action=argparse.BooleanOptionalAction, default=True,
                        help="Packed micro-batches by token budget; --no-use-dynamic-batch-size pads --micro-batch-size rows.")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=None, help="Default: derived by the trainer.")
    parser.add_argument("--log-probs-chunk-size", type=int, default=None)
    parser.add_argument("--recompute-granularity", default=None, choices=("full", "selective"))
    parser.add_argument("--recompute-method", default="uniform", choices=("uniform", "block"))
    parser.add_argument("--recompute-num-layers", type=int, default=1)
    parser.add_argument("--optimizer-cpu-offload", action="store_true",
                        help="Float32 masters and AdamW moments in host memory, AdamW stepped there (7B on one GPU).")
    parser.add_argument("--with-old-logprobs", action="store_true", help="Also time a compute_logprobs pass per step.")
    parser.add_argument("--compare-hf", action="store_true", help="Also time a plain HF training loop on the same batch.")
    parser.add_argument("--hf-micro-batch-size", type=int, default=8,
                        help="Rows per micro-batch of the plain HF loop; default 8 (up to 16k tokens at the default "
                             "lengths: its float32 logits alone take 4.6 GiB per 1k tokens of the 151k vocabulary).")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"Peak of the MFU; default {H100_DENSE_BF16_TFLOPS:g} on CUDA (H100 dense bf16), none on CPU.")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.min_len is None:
        args.min_len = min(DEFAULT_MIN_LEN, args.max_len)
    if not 1 <= args.min_len <= args.max_len:
        parser.error(f"need 1 <= --min-len <= --max-len, got {args.min_len} and {args.max_len}")
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error(f"need --steps >= 1 and --warmup-steps >= 0, got {args.steps} and {args.warmup_steps}")
    if args.max_tokens_per_gpu is not None and not args.use_dynamic_batch_size:
        parser.error("--max-tokens-per-gpu has no effect with --no-use-dynamic-batch-size")
    return args


def make_samples(args: argparse.Namespace, vocab_size: int) -> list[Sample]:
    """The batch's sequences; the samples of a prompt share its tokens, as in a rollout."""
    rng = random.Random(args.seed)
    samples = []
    for group in range(args.num_prompts):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(args.min_len, args.max_len))]
        for _ in range(args.n_samples_per_prompt):
            response = [rng.randrange(vocab_size) for _ in range(rng.randint(args.min_len, args.max_len))]
            samples.append(Sample(prompt="", group_index=group, index=len(samples), prompt_tokens=prompt,
                                  tokens=prompt + response, response_length=len(response),
                                  loss_mask=[1] * len(response), rollout_log_probs=[-1.0] * len(response)))
    return samples


def train_config(args: argparse.Namespace, device: torch.device) -> TrainConfig:
    dtype = args.train_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return TrainConfig(lr=args.lr, seed=args.seed, train_device=str(device), train_dtype=dtype,
                       train_model_impl=args.train_model_impl, use_dynamic_batch_size=args.use_dynamic_batch_size,
                       micro_batch_size=args.micro_batch_size, max_tokens_per_gpu=args.max_tokens_per_gpu,
                       log_probs_chunk_size=args.log_probs_chunk_size,
                       recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                       recompute_num_layers=args.recompute_num_layers,
                       optimizer_cpu_offload=args.optimizer_cpu_offload)


def batching_report(batch: TrainBatch, config: TrainConfig) -> dict:
    """How the trainer splits the batch: micro-batch count and the tokens it computes, padding included."""
    lengths = batch.attention_mask.sum(dim=1)
    rows = micro_batch_rows(batch.attention_mask, config)
    computed = sum(int(lengths[r].sum()) if config.use_dynamic_batch_size else len(r) * int(lengths[r].max())
                   for r in rows)
    return {"packed": config.use_dynamic_batch_size, "max_tokens_per_gpu": config.max_tokens_per_gpu,
            "micro_batch_size": None if config.use_dynamic_batch_size else config.micro_batch_size,
            "num_micro_batches": len(rows), "computed_tokens": computed}


def time_our_trainer(path: str, samples: list[Sample], args, config: TrainConfig, model_config) -> tuple[TrainTimes, dict]:
    """Timed steps of TorchTrainer on ``samples``; also its start-up time and how it split the batch."""
    from sluice.trainer.torch_backend import TorchTrainer

    started = time.perf_counter()
    trainer = TorchTrainer(path, config, AlgorithmConfig(), temperature=1.0)
    startup = time.perf_counter() - started
    advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    batch = collate(samples, advantages, pad_id=0)

    def old_logprobs() -> None:
        batch.old_log_probs = trainer.compute_logprobs(batch)

    times = time_steps(trainer.device, args.warmup_steps, args.steps, lambda: trainer.train_step(batch),
                       getattr(trainer, "optimizer", None), old_logprobs if args.with_old_logprobs else None)
    return times, {"trainer_startup_s": round(startup, 2), "batching": batching_report(batch, trainer.config)}


def figures(times: TrainTimes, tokens: int, flops_train: int, flops_forward: int, peak_tflops: float | None) -> dict:
    step = mean(times.train_step_s)
    out = {"train_step_s": round(step, 4), "train_step_s_each": [round(s, 4) for s in times.train_step_s],
           "train_tok_s": round(tokens / step, 1), "mfu": _round(mfu(flops_train, step, peak_tflops))}
    if times.optimizer_s:
        out["optimizer_s"] = round(mean(times.optimizer_s), 4)
    if times.old_logprobs_s:
        old = mean(times.old_logprobs_s)
        out.update(old_logprobs_s=round(old, 4), old_logprobs_tok_s=round(tokens / old, 1),
                   old_logprobs_mfu=_round(mfu(flops_forward, old, peak_tflops)),
                   step_with_old_logprobs_tok_s=round(tokens / (step + old), 1))
    out["peak_memory_gib"] = times.peak_memory_gib
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def bench_train(argv: list[str]) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    config = train_config(args, device)
    model_config = shape_config(args.model_shape)
    samples = make_samples(args, model_config.vocab_size)
    lengths = [len(s.tokens) for s in samples]
    tokens = sum(lengths)
    peak = args.peak_tflops if args.peak_tflops is not None else (H100_DENSE_BF16_TFLOPS if device.type == "cuda" else None)
    flops_train, flops_forward = train_flops(model_config, lengths), train_flops(model_config, lengths, backward=False)
    report = {
        "bench": "train", "model_shape": args.model_shape, "device": device_name(device),
        "torch": torch.__version__, "commit": git_commit(), "train_dtype": config.train_dtype,
        "train_model_impl": config.train_model_impl,
        "workload": {"num_prompts": args.num_prompts, "n_samples_per_prompt": args.n_samples_per_prompt,
                     "len_range": [args.min_len, args.max_len], "steps": args.steps, "warmup_steps": args.warmup_steps,
                     "with_old_logprobs": args.with_old_logprobs},
        "tokens_per_step": tokens, "response_tokens_per_step": sum(s.response_length for s in samples),
        "recompute": {"granularity": config.recompute_granularity, "method": config.recompute_method,
                      "num_layers": config.recompute_num_layers},
        "log_probs_chunk_size": config.log_probs_chunk_size, "optimizer_cpu_offload": config.optimizer_cpu_offload,
        "matmul_params": matmul_parameters(model_config), "train_flops_per_step": flops_train,
        "mfu_formula": MFU_FORMULA, "old_logprobs_mfu_formula": FORWARD_MFU_FORMULA, "peak_tflops": peak,
    }
    # Random weights in the benchmark's compute dtype; each trainer loads them at its own precision.
    checkpoint_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(args.model_shape, tmp, checkpoint_dtype, str(device), args.seed)
        _free_device_memory(device)
        try:
            times, setup = time_our_trainer(str(path), samples, args, config, model_config)
        except PhaseOutOfMemory as error:  # a result of this shape and budget: said in the JSON line, not a crash
            report["error"] = str(error)
            return report
        except torch.cuda.OutOfMemoryError as error:  # before the timed loop: loading, the budget's read
            report["error"] = f"out of memory in the trainer's start-up: {str(error).splitlines()[0]}"
            return report
        _free_device_memory(device)  # the trainer is gone: its weights, moments and cache go back before HF loads
        report.update(setup)
        report.update(figures(times, tokens, flops_train, flops_forward, peak))
        if args.compare_hf:
            print(json.dumps(report), file=sys.stderr, flush=True)  # ours, whatever happens to the HF loop
            dtype = getattr(torch, config.train_dtype)
            report["hf"] = {"micro_batch_size": args.hf_micro_batch_size}
            try:
                hf_times, num_micro = time_hf_training(path, samples, args.hf_micro_batch_size, args.warmup_steps,
                                                       args.steps, device, dtype, args.lr)
            except (PhaseOutOfMemory, torch.cuda.OutOfMemoryError) as error:  # a result, not a crash
                report["hf"]["error"] = str(error).splitlines()[0]
            else:
                report["hf"].update(num_micro_batches=num_micro,
                                    **figures(hf_times, tokens, flops_train, flops_forward, peak))
                report["speedup_vs_hf"] = round(report["train_tok_s"] / report["hf"]["train_tok_s"], 3)
    return report


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    report = bench_train(argv)
    if "error" in report:
        print(f"sluice bench train: {report['error']}; try a smaller --max-tokens-per-gpu, "
              f"--recompute-granularity, or a smaller shape", file=sys.stderr)
    else:
        print_table(report, sys.stderr)
    print(json.dumps(report))
    return 1 if "error" in report else 0
