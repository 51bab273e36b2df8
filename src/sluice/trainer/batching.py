"""Samples -> TrainBatch (right-padded, per-target-token tensors) and the micro-batch split."""

from __future__ import annotations

import torch

from sluice import algorithms
from sluice.config import TrainConfig
from sluice.config.sections import GRPO_STD_ESTIMATORS
from sluice.trainer.packing import token_budget_rows
from sluice.types import Sample, TrainBatch


def collate(samples: list[Sample], advantages: list[float], pad_id: int) -> TrainBatch:
    """Pad samples into one TrainBatch; ``advantages[i]`` is broadcast over sample i's response tokens.

    Target position t (0-based, over input_ids[:, 1:]) holds token t+1, so response token j of a sample with
    prompt length P sits at target position P - 1 + j.
    """
    width = max(len(s.tokens) for s in samples)
    num = len(samples)
    input_ids = torch.full((num, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((num, width), dtype=torch.long)
    loss_mask = torch.zeros((num, width - 1))
    token_advantages = torch.zeros((num, width - 1))
    rollout_log_probs = torch.zeros((num, width - 1))
    for row, sample in enumerate(samples):
        length, start = len(sample.tokens), len(sample.prompt_tokens) - 1
        num_response = length - len(sample.prompt_tokens)
        input_ids[row, :length] = torch.tensor(sample.tokens, dtype=torch.long)
        attention_mask[row, :length] = 1
        mask = sample.loss_mask if sample.loss_mask else [1] * num_response
        loss_mask[row, start : start + num_response] = torch.tensor(mask[:num_response], dtype=torch.float)
        token_advantages[row, start : start + num_response] = advantages[row]
        if sample.rollout_log_probs:
            rollout_log_probs[row, start : start + num_response] = torch.tensor(sample.rollout_log_probs[:num_response])
    rewards = torch.tensor([_reward_or_zero(s) for s in samples], dtype=torch.float)
    return TrainBatch(input_ids, attention_mask, loss_mask * attention_mask[:, 1:], token_advantages,
                      rollout_log_probs, rewards=rewards)


def _reward_or_zero(sample: Sample) -> float:
    return float(sample.reward) if isinstance(sample.reward, (int, float)) else 0.0


def split(batch: TrainBatch, micro_batch_size: int) -> list[TrainBatch]:
    """Consecutive micro-batches of at most ``micro_batch_size`` samples, padding trimmed per micro-batch."""
    return [batch.select(slice(i, i + micro_batch_size)) for i in range(0, batch.num_samples, micro_batch_size)]


def split_by_length(batch: TrainBatch, micro_batch_size: int) -> list[TrainBatch]:
    """Micro-batches of rows of similar length, longest first: less padding to compute through.

    Only for results that are sums over rows (the loss and its gradient); per-row outputs would come back
    permuted. Row order cannot change the loss, which is divided by the step's global token count.
    """
    lengths = batch.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    return [batch.select(order[i : i + micro_batch_size]) for i in range(0, batch.num_samples, micro_batch_size)]


def micro_batch_rows(attention_mask: torch.Tensor, config: TrainConfig) -> list[torch.Tensor]:
    """Row indices of each micro-batch of a step: packed by token budget with --use-dynamic-batch-size, else
    --micro-batch-size rows of similar length, longest first (less padding to compute through).

    Every forward pass of the trainer (old, reference and training logprobs, critic values) uses this one
    layout, so the passes see identical inputs and agree bitwise. Results are scattered back by row index.
    """
    lengths = attention_mask.sum(dim=1)
    if config.use_dynamic_batch_size:
        return token_budget_rows(lengths, config.max_tokens_per_gpu)
    order = torch.argsort(lengths, descending=True, stable=True)
    size = config.micro_batch_size
    return [order[i : i + size] for i in range(0, order.numel(), size)]


def group_advantages(estimator: str, rewards: list[list[float]], disable_std_normalization: bool = False) -> list[float]:
    """Per-sample advantages from per-group rewards with the named estimator, flattened in sample order."""
    # As in slime, --disable-grpo-std-normalization drops the std of every estimator that uses GRPO's advantage.
    name = "dr_grpo" if (estimator in GRPO_STD_ESTIMATORS and disable_std_normalization) else estimator
    sizes = {len(r) for r in rewards}
    if len(sizes) == 1:  # equal group sizes: one batched call
        advantages, _ = algorithms.get("advantage", name)(torch.tensor(rewards, dtype=torch.float64))
        return advantages.flatten().tolist()
    out: list[float] = []
    for group_rewards in rewards:  # ragged groups (failed samples dropped): one call each
        advantages, _ = algorithms.get("advantage", name)(torch.tensor([group_rewards], dtype=torch.float64))
        out.extend(advantages.flatten().tolist())
    return out


def fill_rows(out: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``out[rows, :width] = values`` (to the host) for each micro-batch's ``(rows, values)``; returns ``out``.

    Called once every micro-batch of a pass is queued, so the device runs them back to back: a read-back after
    each would leave it idle while the host prepares the next."""
    for rows, values in pieces:
        out[rows, : values.shape[1]] = values.cpu()
    return out
