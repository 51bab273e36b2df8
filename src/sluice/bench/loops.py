"""`sluice bench loops`: the demo's GRPO stage run with the synchronous loop and with ``--async``, one after the
other, from the same warm start: wall time, final accuracy and pool idle fractions of each, and their ratio.

It reuses a demo directory (``sluice demo --out DIR``: its ``sft_model`` and ``data``) and runs ``sluice train``
with the demo's own RL flags as a subprocess per loop, by default with the trainer and the engine in separate Ray
actors (``--orchestrator ray``). The async run adds ``--use-rollout-logprobs``, as ``sluice demo --async`` does.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from sluice.bench.run_info import git_commit
from sluice.demo.run import TASK_NAMES, rl_flags
from sluice.errors import ConfigError

LOOPS = ("sync", "async")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sluice bench loops", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--demo-dir", default="runs/demo", help="A directory made by `sluice demo --out DIR`.")
    parser.add_argument("--out", default=None, help="Run directories (default: DEMO_DIR/bench_loops).")
    parser.add_argument("--loops", default="sync,async", help="Comma-separated, from: sync, async.")
    parser.add_argument("--num-rollout", type=int, default=100)
    parser.add_argument("--rollout-batch-size", type=int, default=32)
    parser.add_argument("--rl-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto, for the trainer and the engine.")
    parser.add_argument("--orchestrator", default="ray", choices=("ray", "local"))
    args = parser.parse_args(argv)
    args.loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    unknown = [name for name in args.loops if name not in LOOPS]
    if unknown or not args.loops:
        parser.error(f"--loops {','.join(unknown) or '(empty)'}: expected a comma-separated list of {', '.join(LOOPS)}")
    return args


def demo_files(demo_dir: Path) -> dict[str, Path]:
    """The demo's warm-started model and task files; a missing one is named, with the command that makes it."""
    files = {"model": demo_dir / "sft_model", "train": demo_dir / "data" / "train.jsonl"}
    files.update({f"eval_{task}": demo_dir / "data" / f"eval_{task}.jsonl" for task in TASK_NAMES})
    missing = [str(path) for path in files.values() if not path.exists()]
    if missing:
        raise ConfigError(f"--demo-dir {demo_dir}: missing {', '.join(missing)}; make it with "
                          f"`sluice demo --out {demo_dir}` (--num-rollout 1 is enough)")
    return files


def run_loop(name: str, files: dict[str, Path], run_dir: Path, args: argparse.Namespace) -> dict:
    options = SimpleNamespace(seed=args.seed, rollout_batch_size=args.rollout_batch_size, num_rollout=args.num_rollout,
                              rl_lr=args.rl_lr, device=args.device, progress_bar=False, async_train=name == "async",
                              orchestrator=args.orchestrator)
    flags = rl_flags(files["model"], files, run_dir, options)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "sluice.cli", "train", *flags], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the {name} run failed (exit {done.returncode}); see {run_dir / 'train.log'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "perf/step_time_s" in r]
    evals = [r for r in records if f"eval/{TASK_NAMES[0]}/accuracy" in r]

    def mean(key: str) -> float:
        return round(sum(r.get(key, 0.0) for r in steps) / len(steps), 3)

    return {"wall_s": round(wall, 1), "steps": len(steps),
            **{task: evals[-1][f"eval/{task}/accuracy"] for task in TASK_NAMES},
            "mean_step_s": mean("perf/step_time_s"), "rollout_idle_frac": mean("perf/rollout_idle_frac"),
            "train_idle_frac": mean("perf/train_idle_frac"), "max_staleness": max(
                (r.get("rollout/staleness_max", 0.0) for r in steps), default=0.0)}


def bench_loops(argv: list[str]) -> dict:
    args = parse_args(argv)
    demo_dir = Path(args.demo_dir)
    files = demo_files(demo_dir)
    out = Path(args.out) if args.out else demo_dir / "bench_loops"
    runs = {name: run_loop(name, files, out / name, args) for name in args.loops}
    report = {"bench": "loops", "commit": git_commit(), "device": args.device, "orchestrator": args.orchestrator,
              "demo_dir": str(demo_dir), "num_rollout": args.num_rollout, "rollout_batch_size": args.rollout_batch_size,
              "runs": runs}
    if "sync" in runs and "async" in runs:
        report["async_over_sync_wall"] = round(runs["async"]["wall_s"] / runs["sync"]["wall_s"], 3)
    return report


def main(argv: list[str]) -> int:
    try:
        report = bench_loops(argv)
    except ConfigError as error:
        print(f"sluice bench loops: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0
