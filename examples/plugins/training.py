"""Trainer-side plug-ins: --custom-advantage-function-path and --custom-loss-function-path."""

from __future__ import annotations

import torch

from sluice.trainer.custom_advantage import AdvantageInputs
from sluice.trainer.custom_loss import LossInputs


def leave_one_out(inputs: AdvantageInputs) -> torch.Tensor:
    """RLOO by hand: each sample's reward minus the mean of the other samples of its group."""
    per_sample = []
    for group in inputs.rewards:
        total = sum(group)
        per_sample += [r - (total - r) / max(len(group) - 1, 1) for r in group]
    return inputs.broadcast(torch.tensor(per_sample))


def reinforce(inputs: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain REINFORCE: -A * log pi, reduced as the built-in loss is (--loss-agg-mode)."""
    per_token = -inputs.batch.advantages * inputs.log_probs
    return inputs.reduce(per_token), {"mean_advantage": inputs.reduce(inputs.batch.advantages)}
