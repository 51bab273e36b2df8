"""The loss of one micro-batch: policy (or SFT) loss + KL - entropy bonus, token-mean over the step.

Every term is summed over the micro-batch's masked tokens and divided by the token count of the whole
optimizer step (``num_tokens``), so the sum of micro-batch losses is the full-batch loss whatever the
micro-batch size. Metrics are returned as sums with the same divisor, to be added up across micro-batches.
"""

from __future__ import annotations

import torch

from sluice.algorithms import aggregate, kl_estimate, ppo_clip, sft_nll
from sluice.config import AlgorithmConfig
from sluice.types import TrainBatch


def micro_batch_loss(
    config: AlgorithmConfig,
    batch: TrainBatch,
    log_probs: torch.Tensor,
    entropy: torch.Tensor | None,
    num_tokens: float,
    num_sequences: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    mask = batch.loss_mask

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return aggregate(x, mask, "token_mean", num_tokens=num_tokens, num_sequences=num_sequences)

    metrics: dict[str, float] = {}
    if config.loss_type == "sft_loss":
        per_token = sft_nll(log_probs)
    else:
        # Without a separate pass for old logprobs (one optimizer step per rollout, on-policy), the ratio is
        # exactly 1 with the gradient of the current policy: the detached current logprobs are the old ones.
        old = batch.old_log_probs if batch.old_log_probs is not None else log_probs.detach()
        per_token, stats = ppo_clip(log_probs, old, batch.advantages, config.eps_clip, config.eps_clip_high)
        metrics["train/pg_loss"] = reduce(per_token.detach()).item()
        metrics["train/clipfrac"] = reduce(stats["clipfrac"].float()).item()
        metrics["train/ppo_kl"] = reduce(stats["approx_kl"].detach()).item()
    if config.use_kl_loss:
        kl = kl_estimate(log_probs, batch.ref_log_probs, config.kl_loss_type)
        per_token = per_token + config.kl_loss_coef * kl
        metrics["train/kl_loss"] = reduce(kl.detach()).item()
    if entropy is not None:
        if config.entropy_coef:
            per_token = per_token - config.entropy_coef * entropy
        metrics["train/entropy"] = reduce(entropy.detach()).item()
    loss = reduce(per_token)
    metrics["train/loss"] = loss.item()
    return loss, metrics
