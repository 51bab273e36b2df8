"""``sluice demo``: build a tiny model and tasks, warm-start it with SFT, then improve it with GRPO.

The warm-start demonstrations come from a sloppy teacher (see ``tasks.sloppy_answer``): imitation learns
its slips along with the skill, and RL against an exact-match verifier has to unlearn them. This is the
situation RL post-training is for: the reward knows more than the demonstrations.

Everything after the build treats the model as any Hugging Face checkpoint directory: both phases are
``sluice train`` runs with ordinary flags (printed, so they can be re-run by hand), the warm start with SFT from
data (``--rollout-function-path sft``), the RL phase with GRPO.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from sluice.config import parse_config, validate
from sluice.demo.model import TinyModelShape, build_checkpoint
from sluice.demo.tasks import read_prompts, write_task_file, write_teacher_file
from sluice.demo.warm_start import WarmStart, warm_start
from sluice.loops import train
from sluice.observability.report import render_report
from sluice.orchestration import build_run

TASK_NAMES = ("add", "reverse")


def build_task_files(data_dir: Path, num_train: int, num_eval: int, seed: int,
                     teacher_error_rate: float = 0.0) -> dict[str, Path]:
    """Train/eval prompt files per task, the mixed RL prompt file, and the teacher's demonstrations."""
    files = {}
    for task in TASK_NAMES:
        files[f"eval_{task}"] = write_task_file(data_dir / f"eval_{task}.jsonl", task, num_eval, seed + 1)
        held_out = read_prompts(files[f"eval_{task}"])
        files[f"train_{task}"] = write_task_file(data_dir / f"train_{task}.jsonl", task, num_train, seed, held_out)
    mixed = data_dir / "train.jsonl"
    lines = [line for task in TASK_NAMES for line in files[f"train_{task}"].read_text().splitlines()]
    mixed.write_text("\n".join(lines) + "\n")
    files["train"] = mixed
    files["teacher"] = write_teacher_file(data_dir / "warm_start.jsonl", mixed, teacher_error_rate, seed)
    return files


def rl_flags(model_dir: Path, files: dict[str, Path], run_dir: Path, args) -> list[str]:
    return [
        "--hf-checkpoint", str(model_dir), "--prompt-data", str(files["train"]), "--input-key", "input",
        "--label-key", "label", "--apply-chat-template", "--rollout-shuffle", "--rollout-seed", str(args.seed),
        "--rollout-batch-size", str(args.rollout_batch_size), "--n-samples-per-prompt", "8",
        "--rollout-max-response-len", "8", "--rollout-temperature", "1.0", "--num-rollout", str(args.num_rollout),
        "--micro-batch-size", "64", "--lr", str(args.rl_lr), "--adam-beta2", "0.98", "--lr-warmup-iters", "5",
        "--clip-grad", "1.0", "--eps-clip", "0.2", "--eps-clip-high", "0.28",
        "--rm-type", "exact", "--eval-interval", str(max(args.num_rollout // 5, 1)),
        "--eval-prompt-data", "add", str(files["eval_add"]), "reverse", str(files["eval_reverse"]),
        "--n-samples-per-eval-prompt", "1", "--eval-temperature", "0",
        "--seed", str(args.seed), "--train-device", args.device, "--sglang-device", args.device,
        # the demo rebuilds everything under --out on each run, its RL run directory included
        "--run-dir", str(run_dir), "--overwrite-run-dir", *([] if args.progress_bar else ["--no-progress-bar"]),
        # async: PPO's ratio against the policy that sampled each token (one version behind), see the README
        *(["--async", "--use-rollout-logprobs"] if getattr(args, "async_train", False) else []),
        "--orchestrator", getattr(args, "orchestrator", "local"),
    ]


def run_demo(args, log=print) -> dict:
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    out = Path(args.out)
    base_dir, sft_dir, data_dir = out / "base_model", out / "sft_model", out / "data"
    shape = TinyModelShape(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                           num_hidden_layers=args.num_layers)
    build_checkpoint(base_dir, shape=shape, seed=args.seed)
    files = build_task_files(data_dir, args.num_train, args.num_eval, args.seed, args.teacher_error_rate)
    log(f"built {base_dir} and tasks in {data_dir} ({time.perf_counter() - start:.1f}s)")

    flags = rl_flags(sft_dir, files, out / "rl", args)
    config = parse_config(flags)
    validate(config)  # before the warm start: a bad demo flag fails now, not minutes later
    sft = WarmStart(base_dir, files["teacher"], sft_dir, out / "sft", args.sft_steps, batch_size=256,
                    micro_batch_size=64, lr=args.sft_lr, seed=args.seed, device=args.device,
                    progress_bar=args.progress_bar)
    sft.config()  # checked now too

    log(f"warm start: {args.sft_steps} SFT steps on {files['teacher']} "
        f"(teacher slips on {args.teacher_error_rate:.0%} of answers)")
    log("SFT: sluice train " + shlex.join(sft.flags()))
    warm_start(sft, log=log)
    sft_seconds = time.perf_counter() - start

    log("RL: sluice train " + shlex.join(flags))
    run = build_run(config, log=log, command=["sluice", "train", *flags])
    try:
        train(run)
    finally:
        png = run.close()
    report = render_report(out / "rl")  # the plots and summary.html, as `sluice train` draws them at its end
    summary = summarize(out / "rl" / "metrics.jsonl", time.perf_counter() - start, sft_seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(format_summary(summary, png) + f"; summary: {report.html}")
    return summary


def summarize(metrics_path: Path, wall_s: float, sft_s: float) -> dict:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    first, last = evals[0], evals[-1]
    out = {"wall_time_s": round(wall_s, 1), "warm_start_time_s": round(sft_s, 1)}
    for task in TASK_NAMES:
        key = f"eval/{task}/accuracy"
        out[task] = {"warm_start": first[key], "after_rl": last[key]}
    out["mean"] = {stage: sum(out[t][stage] for t in TASK_NAMES) / len(TASK_NAMES) for stage in ("warm_start", "after_rl")}
    return out


def format_summary(summary: dict, png: Path) -> str:
    rows = [f"{name:8s} {summary[name]['warm_start']:6.1%} -> {summary[name]['after_rl']:6.1%}"
            for name in (*TASK_NAMES, "mean")]
    return ("eval accuracy (greedy), warm start -> after RL\n  " + "\n  ".join(rows)
            + f"\nwall time {summary['wall_time_s']:.0f}s; curves: {png}")
