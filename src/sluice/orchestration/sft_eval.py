"""--eval-sft-data: at each evaluation, the SFT loss of held-out rows under the trainer's current weights."""

from __future__ import annotations

from dataclasses import dataclass

from sluice.orchestration.pools import TrainerPool
from sluice.types import Sample


@dataclass
class SftEval:
    trainer: TrainerPool | None  # None with --debug-rollout-only (the config checks refuse sets then)
    sets: dict[str, list[Sample]]  # --eval-sft-data, by name: rows with their responses and loss masks

    def losses(self) -> dict[str, float]:
        """eval/<set>/sft_loss (mean NLL per trained token) and eval/<set>/sft_tokens of each set."""
        out: dict[str, float] = {}
        for name, samples in self.sets.items():
            loss = self.trainer.held_out_loss(samples)
            out[f"eval/{name}/sft_loss"] = loss.token_mean
            out[f"eval/{name}/sft_tokens"] = float(loss.num_tokens)
        return out
