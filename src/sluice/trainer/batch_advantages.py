"""Rewards -> per-token advantages for every --advantage-estimator, with the --kl-coef reward penalty.

Two families (formulas in docs/algorithms.md):

* group estimators (grpo, dr_grpo, gspo, cispo, rloo, reinforce_plus_plus_baseline_sample): one scalar per sample,
  normalised within its prompt group (not with --disable-rewards-normalization), broadcast over the sample's
  trained tokens. --kl-coef first subtracts ``kl_coef * sum_t KL_t`` (the response's KL) from the sample's
  reward, so the group sees the KL-regularised return.
* token estimators: reinforce_plus_plus (discounted returns of the token rewards, whitened over the batch),
  reinforce_plus_plus_baseline (the group-centred reward on every trained token, minus ``kl_coef * KL_t``,
  whitened over the batch's tokens, as slime and verl compute it) and ppo (GAE over the critic's values, which
  also yields the critic's targets). For reinforce_plus_plus and ppo, --kl-coef puts ``-kl_coef * KL_t`` on
  every trained token, the outcome reward on the last one.

KL_t is the --kl-loss-type estimate between the policy that sampled the rollout (the trainer's old logprobs,
or the engine's with --use-rollout-logprobs) and the reference model: a fixed number, not differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sluice.algorithms import (
    broadcast_to_tokens,
    explained_variance,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    token_level_rewards,
)
from sluice.config import AlgorithmConfig
from sluice.config.sections import TOKEN_LEVEL_ESTIMATORS
from sluice.trainer.batching import group_advantages
from sluice.trainer.custom_advantage import AdvantageFn, AdvantageInputs
from sluice.trainer.critic import ValueBatch
from sluice.types import TrainBatch

@dataclass
class Advantages:
    """The result of scoring a rollout batch for the policy (and critic) update."""

    token_advantages: Tensor  # [B, T-1] float32, 0 off the loss mask
    value_batch: ValueBatch | None = None  # ppo: the critic's rollout-time values and GAE returns
    metrics: dict[str, float] = field(default_factory=dict)


def compute_advantages(trainer, batch: TrainBatch, algorithm: AlgorithmConfig,
                       rewards: list[list[float]], custom: tuple[AdvantageFn, AdvantageInputs] | None = None,
                       ) -> Advantages:
    """Advantages of ``batch`` (rows in group order); ``rewards[g][i]`` is the reward of group g's i-th row.

    Needs ``batch.ref_log_probs`` with --kl-coef; uses ``batch.old_log_probs`` when set, else asks the trainer
    for the current logprobs. With ppo, the trainer's critic provides the values. ``custom``
    (--custom-advantage-function-path) replaces the estimator: the function and its inputs.
    """
    if custom is not None:
        fn, inputs = custom
        advantages = fn(inputs)
        mean = masked_mean(advantages, batch.loss_mask).item()
        return Advantages(advantages, metrics={"train/custom_advantage_mean": mean})
    mask = batch.loss_mask
    flat = torch.tensor([r for group in rewards for r in group], dtype=torch.float64)
    metrics: dict[str, float] = {}
    kl = reward_kl(trainer, batch, algorithm) if algorithm.kl_coef > 0 else None
    if kl is not None:
        metrics["train/reward_kl"] = masked_mean(kl, mask).item()
    estimator = algorithm.advantage_estimator
    if estimator not in TOKEN_LEVEL_ESTIMATORS:
        shaped = kl_penalized_rewards(flat, kl, mask, algorithm.kl_coef) if kl is not None else flat
        if algorithm.disable_rewards_normalization:  # REINFORCE without a baseline
            per_sample = shaped.tolist()
        else:
            per_sample = group_advantages(estimator, _regroup(shaped.tolist(), [len(g) for g in rewards]),
                                          algorithm.disable_grpo_std_normalization)
        return Advantages(broadcast_to_tokens(torch.tensor(per_sample), mask).float(), metrics=metrics)
    if estimator == "reinforce_plus_plus_baseline":
        sizes = [len(g) for g in rewards]
        baselined = flat.tolist() if algorithm.disable_rewards_normalization else group_advantages(
            "dr_grpo", _regroup(flat.tolist(), sizes))  # r - group mean, exactly 0 for a constant group
        advantages, estimator_metrics = reinforce_plus_plus_baseline(torch.tensor(baselined), mask, kl,
                                                                     algorithm.kl_coef)
        metrics["train/return_mean"] = estimator_metrics["return_mean"]
        return Advantages(advantages.float(), metrics=metrics)
    token_rewards = token_level_rewards(flat, mask, kl, algorithm.kl_coef)
    if estimator == "reinforce_plus_plus":
        advantages, estimator_metrics = reinforce_plus_plus(token_rewards, mask, algorithm.gamma)
        metrics["train/return_mean"] = estimator_metrics["return_mean"]
        return Advantages(advantages.float(), metrics=metrics)
    values = trainer.compute_values(batch)
    advantages, returns = gae(token_rewards, values, mask, algorithm.gamma, algorithm.lambd)
    metrics["train/explained_variance"] = explained_variance(values, returns, mask)
    metrics["train/return_mean"] = masked_mean(returns, mask).item()
    value_batch = ValueBatch(batch.input_ids, batch.attention_mask, mask, values, returns.float())
    return Advantages(advantages.float(), value_batch, metrics)


def reward_kl(trainer, batch: TrainBatch, algorithm: AlgorithmConfig) -> Tensor:
    """Per-token ``--kl-loss-type`` estimate of KL(rollout policy || reference) ``[B, T-1]``, 0 off the mask."""
    if batch.ref_log_probs is None:
        raise ValueError("--kl-coef needs the reference model's logprobs (batch.ref_log_probs); none were computed")
    policy = batch.old_log_probs if batch.old_log_probs is not None else trainer.compute_logprobs(batch)
    kl = kl_estimate(policy, batch.ref_log_probs, algorithm.kl_loss_type)
    return torch.where(batch.loss_mask.bool(), kl, 0.0)


def _regroup(values: list[float], sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for size in sizes:
        out.append(values[start : start + size])
        start += size
    return out
