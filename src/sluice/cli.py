"""The `sluice` command: train, serve, bench, demo, plot."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from sluice.config import parse_config, validate
from sluice.config.flags import ENGINE_PREFIX, ENGINE_SECTION, flag_specs
from sluice.data import DataError
from sluice.errors import ConfigError

if TYPE_CHECKING:
    from sluice.engine.server.app import ServeArgs


# Each command and its one-line purpose, as `sluice --help` lists them.
COMMANDS = {
    "train": "RL (or SFT) post-training of a Hugging Face checkpoint: rollout, reward, train, weight sync, eval",
    "serve": "serve a model over SGLang's HTTP API and an OpenAI-compatible API",
    "bench": "benchmarks (rollout, train, sync, loops) that print one JSON line each",
    "demo": "build a tiny model and tasks, warm-start it with SFT, then train it with GRPO",
    "plot": "draw a run directory's plots and summary.html from its metrics.jsonl",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: sluice [-h] [--version] {{{','.join(COMMANDS)}}} ...", "",
             "RL post-training of LLMs: our own rollout engine, a PyTorch trainer and a data buffer.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {purpose}" for name, purpose in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this help and exit", "  --version   print the version and exit",
              "", "sluice COMMAND --help lists the flags of COMMAND."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_command, "serve": serve_command, "bench": bench_command, "demo": demo_command,
                "plot": plot_command}
    if argv and argv[0] == "--version":
        from sluice import __version__

        print(f"sluice {__version__}")
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in commands:
        if argv:
            print(f"sluice: unknown command {argv[0]!r}; choose one of {', '.join(commands)}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except (ConfigError, DataError) as error:
        print(f"sluice {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not _is_run_stop(error):
            raise
        print(f"sluice {argv[0]}: error: {error}", file=sys.stderr)
        return 1


def _is_run_stop(error: RuntimeError) -> bool:
    """Errors that end a run with a message of their own (no traceback of ours needed): a rollout with no sample
    left, diverged training, out of memory (the message names the flags to turn), a plug-in that raised (the
    message carries the user's own frames)."""
    import torch

    from sluice.plugins import PluginCallError
    from sluice.rollout.failures import RolloutFailed
    from sluice.trainer.guards import NonFiniteTraining

    return isinstance(error, (RolloutFailed, NonFiniteTraining, torch.OutOfMemoryError, PluginCallError))


def train_command(argv: list[str]) -> int:
    """`sluice train --hf-checkpoint DIR --prompt-data FILE ...`: the RL loop (synchronous, or --async)."""
    from sluice.loops import train
    from sluice.observability.report import render_report
    from sluice.orchestration import build_run

    config = parse_config(argv)
    validate(config)
    run = build_run(config, command=["sluice", "train", *argv])
    try:
        train(run)
    finally:
        png = run.close()
    run_dir = run.config.logging.run_dir  # resolved by build_run (a default runs/<date>-<time>)
    report = render_report(run_dir)
    print(f"metrics: {run_dir}/metrics.jsonl  curves: {png}  summary: {report.html}")
    return 0


def serve_command(argv: list[str]) -> int:
    """`sluice serve --model DIR [--port N] [--sglang-* flags]`: the engine behind SGLang's HTTP API."""
    from sluice.engine.server.app import run_server

    return run_server(parse_serve_args(argv))


class _ServeParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _engine_flags_epilog() -> str:
    lines = ["engine flags (SGLang server names):"]
    for spec in flag_specs():
        if spec.section == ENGINE_SECTION:
            lines.append(f"  {spec.flag}  {spec.help} (default: {spec.default})")
    lines.append("  --config FILE  YAML file of flags; only its engine keys are used here")
    return "\n".join(lines)


def parse_serve_args(argv: list[str]) -> ServeArgs:
    """Serve flags plus the --sglang-* engine flags of the config tree; anything else is an error."""
    from sluice.engine.server.app import DEFAULT_PORT, ServeArgs

    parser = _ServeParser(prog="sluice serve", allow_abbrev=False, epilog=_engine_flags_epilog(),
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Serve a model over SGLang's native HTTP API and an OpenAI-compatible API.")
    parser.add_argument("--model", "--model-path", "--hf-checkpoint", dest="model_path", required=True,
                        help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (default: loopback only; any other needs --api-key).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port; 0 picks a free one.")
    parser.add_argument("--served-model-name", default=None, help="Model name in /v1 responses (default: --model).")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--api-key", default=None,
                        help="Key every route but /health requires, as 'Authorization: Bearer KEY' (the OpenAI "
                             "client's api_key); same as --sglang-api-key.")
    parser.add_argument("--admin-api-key", default=None,
                        help="Key the control and weight routes require instead (clients given only --api-key then "
                             "generate but cannot pause, abort or load weights); same as --sglang-admin-api-key.")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="Listen beyond loopback without --api-key: only behind a proxy of your own that "
                             "checks every caller.")
    args, rest = parser.parse_known_args(argv)
    foreign = [a for a in rest if _is_flag(a) and a.split("=", 1)[0] != "--config"
               and not a.startswith("--" + ENGINE_PREFIX)]
    if foreign:
        raise ConfigError(f"unknown flag {foreign[0]}: sluice serve takes --model, --host, --port, "
                          f"--served-model-name, --log-level, --api-key, --admin-api-key, --allow-unauthenticated "
                          f"and engine flags (--{ENGINE_PREFIX}*)")
    config = parse_config(rest)
    engine = config.engine
    engine.api_key = args.api_key if args.api_key is not None else engine.api_key
    engine.admin_api_key = args.admin_api_key if args.admin_api_key is not None else engine.admin_api_key
    validate(config, for_training=False)
    return ServeArgs(args.model_path, args.host, args.port, args.served_model_name, args.log_level, engine,
                     args.allow_unauthenticated)


def _is_flag(token: str) -> bool:
    """``--x`` is a flag; ``-1`` or ``-0.5`` is a (negative) value of the flag before it."""
    if not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def bench_command(argv: list[str]) -> int:
    """`sluice bench {rollout,sync,loops,train} [flags]`: benchmarks that print one JSON line."""
    benches = {"rollout": "sluice.bench.rollout", "sync": "sluice.bench.sync", "loops": "sluice.bench.loops",
               "train": "sluice.bench.train"}
    if not argv or argv[0] not in benches:
        stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        print(f"usage: sluice bench [-h] {{{','.join(benches)}}} [flags]   (sluice bench NAME --help for its flags)",
              file=stream)
        return 0 if stream is sys.stdout else 2
    import importlib

    return importlib.import_module(benches[argv[0]]).main(argv[1:])


def demo_command(argv: list[str]) -> int:
    from sluice.demo.model import TinyModelShape

    parser = argparse.ArgumentParser(prog="sluice demo", allow_abbrev=False,
                                     description="Build a tiny model and tasks, warm-start with SFT, train with GRPO.")
    parser.add_argument("--out", default="runs/demo", help="Directory for the model, data, metrics and curves.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model, the tasks and training.")
    parser.add_argument("--sft-steps", type=int, default=900, help="Supervised warm-start steps (256 examples each).")
    parser.add_argument("--sft-lr", type=float, default=2e-3, help="Learning rate of the warm start.")
    parser.add_argument("--num-rollout", type=int, default=100, help="GRPO rollout steps.")
    parser.add_argument("--rollout-batch-size", type=int, default=32, help="Prompts per GRPO step (8 samples each).")
    parser.add_argument("--rl-lr", type=float, default=3e-4, help="Learning rate of GRPO.")
    parser.add_argument("--teacher-error-rate", type=float, default=0.5,
                        help="Fraction of warm-start answers where the teacher slips (0: clean demonstrations).")
    parser.add_argument("--hidden-size", type=int, default=TinyModelShape.hidden_size, help="Demo model width.")
    parser.add_argument("--intermediate-size", type=int, default=TinyModelShape.intermediate_size,
                        help="Demo model MLP width.")
    parser.add_argument("--num-layers", type=int, default=TinyModelShape.num_hidden_layers, help="Demo model depth.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto, for the trainer and the engine.")
    parser.add_argument("--num-train", type=int, default=4000, help="Training prompts per task.")
    parser.add_argument("--num-eval", type=int, default=200, help="Held-out eval prompts per task.")
    parser.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--async", dest="async_train", action="store_true",
                        help="Run GRPO with sluice train --async (generation overlaps training).")
    parser.add_argument("--orchestrator", choices=("local", "ray"), default="local",
                        help="ray: trainer and engine as separate Ray actors (sluice train --orchestrator ray).")
    from sluice.demo.run import run_demo

    run_demo(parser.parse_args(argv))
    return 0


def plot_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sluice plot", allow_abbrev=False,
        description="Draw a run's curves from its metrics.jsonl: curves.png (overview), plots/*.png (reward and "
                    "eval, response length, KL and entropy, optimization, throughput, stage times) and "
                    "summary.html (every plot and a table of the latest metrics).")
    parser.add_argument("run_dir", help="A run directory holding metrics.jsonl.")
    parser.add_argument("--out", default=None, help="Directory for the PNGs and the HTML page (default: RUN_DIR).")
    args = parser.parse_args(argv)
    from pathlib import Path

    from sluice.observability.report import render_report

    metrics = Path(args.run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        print(f"sluice plot: error: {metrics}: no such file (is {args.run_dir} a run directory?)", file=sys.stderr)
        return 2
    report = render_report(args.run_dir, args.out)
    for path in (report.curves, *report.panels, report.html):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
