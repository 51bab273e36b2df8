"""Supervised warm start of the demo model: a ``sluice train`` run of SFT from data (``--rollout-function-path
sft``) on the teacher's demonstrations, exported as a Hugging Face checkpoint for the RL phase.

It is the run any user gets with these flags (printed, so it can be re-run by hand): the same data loading,
loss mask, trainer and export, no engine.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sluice.config import Config, parse_config, validate
from sluice.loops import train
from sluice.observability.metrics import read_metrics
from sluice.orchestration import build_run


@dataclass
class WarmStart:
    """The warm start's settings; ``flags()`` turns them into ``sluice train`` flags."""

    checkpoint: Path  # the base model (HF directory)
    demonstrations: Path  # jsonl rows with the prompt under "input" and the teacher's answer under response_key
    out_dir: Path  # where the warm-started HF checkpoint goes (--save-hf)
    run_dir: Path  # metrics.jsonl and curves of the SFT run
    num_steps: int
    batch_size: int  # demonstrations per optimizer step
    micro_batch_size: int
    lr: float
    seed: int
    device: str = "cpu"
    response_key: str = "label"
    progress_bar: bool = False

    def flags(self) -> list[str]:
        return [
            "--hf-checkpoint", str(self.checkpoint), "--prompt-data", str(self.demonstrations),
            "--input-key", "input", "--response-key", self.response_key, "--apply-chat-template",
            "--rollout-function-path", "sft", "--loss-type", "sft_loss",
            "--rollout-batch-size", str(self.batch_size), "--num-rollout", str(self.num_steps),
            "--rollout-shuffle", "--rollout-seed", str(self.seed), "--micro-batch-size", str(self.micro_batch_size),
            "--lr", str(self.lr), "--lr-warmup-iters", str(max(self.num_steps // 10, 1)), "--adam-beta2", "0.98",
            "--seed", str(self.seed), "--train-device", self.device, "--save-hf", str(self.out_dir),
            "--run-dir", str(self.run_dir), *([] if self.progress_bar else ["--no-progress-bar"]),
        ]

    def config(self) -> Config:
        config = parse_config(self.flags())
        validate(config)
        return config


def warm_start(settings: WarmStart, log=print) -> Path:
    """Run the SFT steps and export the model to ``settings.out_dir``; the loss is logged at five points."""
    shutil.rmtree(settings.run_dir, ignore_errors=True)  # a re-run starts a fresh metrics file
    run = build_run(settings.config(), log=log)
    try:
        train(run)
    finally:
        run.close()
    losses = [r["train/loss"] for r in read_metrics(settings.run_dir / "metrics.jsonl") if "train/loss" in r]
    every = max(len(losses) // 5, 1)
    for step in range(every, len(losses) + 1, every):
        log(f"  sft step {step}/{len(losses)}: loss {losses[step - 1]:.3f}")
    return settings.out_dir
