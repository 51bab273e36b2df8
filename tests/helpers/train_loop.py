"""The "say 7" task for whole training runs: its flags, its shape, and one synchronous run in this process."""

from __future__ import annotations

from typing import Callable

from pathlib import Path

from sluice.config import parse_config, validate
from sluice.demo.model import TinyModelShape
from sluice.loops import train_sync
from sluice.orchestration import build_run
from sluice.orchestration.run import Run

SHAPE = TinyModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=512)
NUM_ROLLOUT = 14  # 112 prompts handed out: the run ends mid-epoch of the 12-prompt file
SEED = 0
ROLLOUT_BATCH = 8
N_SAMPLES = 8


def flags(model: Path, data: Path, run_dir: Path, save: Path, num_rollout: int, *extra: str) -> list[str]:
    """An easy task: 12 prompts "<c>: say 7", label "7", one response token, exact-match reward.

    The prompt ends in the answer, which the untrained model (tied embeddings, small init) favours a little,
    so the first rollouts score a few percent (the vocabulary has 102 tokens), not zero, and GRPO has a
    signal; with seed 0 the reward reaches ~1 within 10 rollouts (the slowest seed seen, 7, ~0.5). Seeds 0-7 (model, data order and
    trainer) all passed when this test was written: the seed is not cherry-picked.
    """
    return [
        "--hf-checkpoint", str(model), "--prompt-data", str(data), "--label-key", "label",
        "--rollout-batch-size", str(ROLLOUT_BATCH), "--n-samples-per-prompt", str(N_SAMPLES),
        "--rollout-max-response-len", "1", "--rollout-shuffle", "--rollout-seed", str(SEED),
        "--num-rollout", str(num_rollout), "--lr", "3e-2", "--micro-batch-size", "64", "--rm-type", "exact",
        "--seed", str(SEED), "--train-device", "cpu", "--sglang-device", "cpu", "--run-dir", str(run_dir),
        "--save", str(save), "--no-progress-bar", *extra,
    ]


def run_loop(argv: list[str], loop: Callable[[Run], None] = train_sync,
             log: Callable[[str], None] = lambda line: None) -> Run:
    """Parse, check, build and run ``loop`` (default the sync loop; ``loops.train`` picks by --async), then close;
    ``log`` receives the run's log lines."""
    config = parse_config(argv)
    validate(config)
    run = build_run(config, log=log)
    try:
        loop(run)
    finally:
        run.close()
    return run
