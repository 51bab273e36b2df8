"""A calculator-tool agent on the demo addition task: warm-start, then RL with the multi-turn tool generate.

    python examples/calculator_agent/run.py --out runs/calculator

1. builds the tiny demo model with a tool-calling chat template (Qwen's <tool_call> markup, compact);
2. writes 3-digit addition problems ("123+456=" -> "579");
3. warm-starts it with SFT from data (``sluice train --rollout-function-path sft``) on demonstrations, of which
   ``--tool-demo-rate`` call the calculator and the rest answer directly (the loss covers the assistant turns
   only);
4. runs `sluice train` with ``--tools examples/calculator_agent/tools.py:calculator`` and an exact-match reward;
   ``evaluate.py`` reports greedy accuracy and tool-use rate before and after.

A tiny model adds 3-digit numbers poorly but copies a tool's answer well, so RL should move it towards calling
the tool. The numbers this script prints are the measurement; nothing here asserts them (README.md has a run).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from sluice.config import parse_config, validate  # noqa: E402
from sluice.demo.model import TinyModelShape, build_checkpoint  # noqa: E402
from sluice.loops import train_sync  # noqa: E402
from sluice.observability.metrics import read_metrics  # noqa: E402
from sluice.orchestration import build_run  # noqa: E402

TOOL = f"{HERE / 'tools.py'}:calculator"


def write_problems(path: Path, num: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < num:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        prompt = f"{a}+{b}="
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"input": prompt, "label": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def demonstration(row: dict, use_tool: bool) -> dict:
    """One SFT row: the whole conversation, trained on its assistant turns (--response-key = --input-key)."""
    user = {"role": "user", "content": row["input"]}
    if use_tool:
        call = {"name": "calculator", "arguments": {"expression": row["input"].rstrip("=")}}
        turns = [{"role": "assistant", "content": "<tool_call>" + json.dumps(call) + "</tool_call>"},
                 {"role": "tool", "content": row["label"]}, {"role": "assistant", "content": row["label"]}]
    else:
        turns = [{"role": "assistant", "content": row["label"]}]
    return {"messages": [user, *turns]}


def sft_flags(model_dir: Path, data: Path, out_dir: Path, run_dir: Path, args) -> list[str]:
    """SFT from data (--rollout-function-path sft): --tools gives the chat template the tool list, as in RL."""
    return [
        "--hf-checkpoint", str(model_dir), "--prompt-data", str(data), "--input-key", "messages",
        "--response-key", "messages", "--apply-chat-template", "--tools", TOOL,
        "--rollout-function-path", "sft", "--loss-type", "sft_loss", "--rollout-batch-size", str(args.sft_batch_size),
        "--num-rollout", str(args.sft_steps), "--rollout-shuffle", "--rollout-seed", str(args.seed),
        "--lr", str(args.sft_lr), "--lr-warmup-iters", str(max(args.sft_steps // 10, 1)), "--adam-beta2", "0.98",
        "--micro-batch-size", str(args.sft_batch_size), "--seed", str(args.seed), "--train-device", args.device,
        "--save-hf", str(out_dir), "--run-dir", str(run_dir), "--no-progress-bar",
    ]


def warm_start(model_dir: Path, rows: list[dict], out: Path, args, log) -> Path:
    rng = random.Random(args.seed)
    data = out / "sft.jsonl"
    data.write_text("".join(json.dumps(demonstration(row, rng.random() < args.tool_demo_rate)) + "\n"
                            for row in rows))
    flags = sft_flags(model_dir, data, out / "sft_model", out / "sft", args)
    log("SFT: sluice train " + shlex.join(flags))
    run_flags(flags, log)
    losses = [r["train/loss"] for r in read_metrics(out / "sft" / "metrics.jsonl")]
    log(f"  sft loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    return out / "sft_model"


def run_flags(flags: list[str], log) -> None:
    """``sluice train`` with ``flags`` in this process."""
    config = parse_config(flags)
    validate(config)
    run = build_run(config, log=log)
    try:
        train_sync(run)
    finally:
        run.close()


def rl_flags(model_dir: Path, train_file: Path, eval_file: Path, run_dir: Path, args) -> list[str]:
    return [
        "--hf-checkpoint", str(model_dir), "--prompt-data", str(train_file), "--label-key", "label",
        "--apply-chat-template", "--tools", TOOL, "--max-turns", "3", "--rm-type", "exact",
        "--rollout-batch-size", str(args.rollout_batch_size), "--n-samples-per-prompt", "8",
        "--rollout-max-response-len", str(args.max_response_len), "--rollout-shuffle", "--rollout-seed", str(args.seed),
        "--num-rollout", str(args.num_rollout), "--lr", str(args.rl_lr), "--adam-beta2", "0.98",
        "--micro-batch-size", "64", "--eps-clip-high", "0.28", "--seed", str(args.seed),
        "--eval-prompt-data", "add3", str(eval_file), "--eval-temperature", "0",
        "--eval-interval", str(args.num_rollout),
        "--eval-function-path", f"{HERE / 'evaluate.py'}:tool_use_and_accuracy",
        "--train-device", args.device, "--sglang-device", args.device, "--run-dir", str(run_dir), "--no-progress-bar",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/calculator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--tool-demo-rate", type=float, default=0.5)
    parser.add_argument("--sft-steps", type=int, default=1000)
    parser.add_argument("--sft-batch-size", type=int, default=64)
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--num-rollout", type=int, default=30)
    parser.add_argument("--rollout-batch-size", type=int, default=16)
    parser.add_argument("--rl-lr", type=float, default=2e-4)
    parser.add_argument("--max-response-len", type=int, default=160,
                        help="token budget of a conversation (a tool call, its result and the answer take about 85)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for the trainer and the engine")
    parser.add_argument("--hidden-size", type=int, default=256,
                        help="model width (128, the demo's, copies 3-digit operands too poorly to gain from the tool)")
    parser.add_argument("--num-layers", type=int, default=4, help="model depth")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    log = lambda line: print(line, flush=True)  # noqa: E731
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = TinyModelShape(hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
                           num_hidden_layers=args.num_layers)
    base = build_checkpoint(out / "base_model", shape=shape, seed=args.seed, with_tools=True)
    eval_rows = write_problems(out / "eval.jsonl", args.num_eval, seed=args.seed + 1)
    train_rows = write_problems(out / "train.jsonl", args.num_train, args.seed, {r["input"] for r in eval_rows})
    log(f"warm start: {args.sft_steps} SFT steps, {args.tool_demo_rate:.0%} of demonstrations call the calculator")
    for run_dir in ("sft", "rl"):
        shutil.rmtree(out / run_dir, ignore_errors=True)  # a re-run starts fresh metrics files
    sft = warm_start(base, train_rows, out, args, log)
    sft_s = time.perf_counter() - start
    flags = rl_flags(sft, out / "train.jsonl", out / "eval.jsonl", out / "rl", args)
    log("RL: sluice train " + shlex.join(flags))
    run_flags(flags, log)
    evals = [r for r in read_metrics(out / "rl" / "metrics.jsonl") if "eval/add3/accuracy" in r]
    keys = ("accuracy", "tool_use_rate", "accuracy_with_tool", "accuracy_without_tool")
    summary = {"warm_start_s": round(sft_s, 1), "wall_s": round(time.perf_counter() - start, 1),
               **{k: {"before_rl": evals[0].get(f"eval/add3/{k}"), "after_rl": evals[-1].get(f"eval/add3/{k}")}
                  for k in keys}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log("greedy eval on held-out 3-digit additions, before -> after RL")
    for key in keys:
        before, after = summary[key]["before_rl"], summary[key]["after_rl"]
        shown = [f"{v:.1%}" if v is not None else "n/a" for v in (before, after)]
        log(f"  {key:22s} {shown[0]:>7s} -> {shown[1]:>7s}")
    log(f"wall time {summary['wall_s']:.0f} s (warm start {summary['warm_start_s']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
