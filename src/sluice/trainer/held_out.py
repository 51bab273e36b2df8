"""The SFT loss of held-out rows (--eval-sft-data): the trainer's mean NLL over their trained response tokens,
a forward pass only. Data-parallel ranks each run their share of the micro-batches (``compute_logprobs`` is a
collective), so every rank calls this with the same rows."""

from __future__ import annotations

from dataclasses import dataclass

from sluice.trainer.batching import collate
from sluice.types import Sample


@dataclass(frozen=True)
class HeldOutLoss:
    nll_sum: float  # -sum of log p over the rows' trained tokens (loss mask 1)
    num_tokens: int  # the trained tokens summed over

    @property
    def token_mean(self) -> float:
        """The loss of --loss-agg-mode token_mean (the default) over these rows."""
        return self.nll_sum / max(self.num_tokens, 1)


def held_out_loss(trainer, samples: list[Sample], pad_id: int, rows_per_batch: int) -> HeldOutLoss:
    """``samples`` (SFT rows, responses from the data) through ``trainer`` (a TorchTrainer), ``rows_per_batch``
    at a time so a large set is never padded into one tensor."""
    nll_sum, num_tokens = 0.0, 0
    for start in range(0, len(samples), rows_per_batch):
        rows = samples[start:start + rows_per_batch]
        batch = collate(rows, [0.0] * len(rows), pad_id)
        log_probs = trainer.compute_logprobs(batch)
        nll_sum -= float((log_probs * batch.loss_mask).sum())
        num_tokens += int(batch.loss_mask.sum())
    return HeldOutLoss(nll_sum, num_tokens)
