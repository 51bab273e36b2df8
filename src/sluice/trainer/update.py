"""One policy update from a rollout's groups: advantages -> TrainBatch -> logprob passes -> optimizer steps."""

from __future__ import annotations

from collections import defaultdict

from sluice.algorithms import effective_sample_size, importance_weight, masked_mean, whiten
from sluice.config import AlgorithmConfig
from sluice.trainer.batch_advantages import Advantages, compute_advantages
from sluice.trainer.batching import collate
from sluice.trainer.custom_advantage import AdvantageFn, AdvantageInputs
from sluice.trainer.loss import ROLLOUT_LOGPROB_ABS_DIFF, ROLLOUT_POLICY_KL, rollout_mismatch
from sluice.types import Sample, SampleGroup, Status, TrainBatch

MISMATCH_KEYS = (ROLLOUT_LOGPROB_ABS_DIFF, ROLLOUT_POLICY_KL)
# Mean |advantage| over the trained tokens of the rollout batch (after --normalize-advantages).
ADVANTAGE_ABS_MEAN = "train/advantage_abs_mean"


def update_policy(trainer, groups: list[SampleGroup], algorithm: AlgorithmConfig, rewards: list[list[float]],
                  global_batch_size: int, pad_id: int, max_response_len: int | None = None,
                  train_actor: bool = True, advantage_fn: AdvantageFn | None = None) -> dict[str, float]:
    """Train on every non-failed sample; ``rewards[g][i]`` is the scalar reward of groups[g].samples[i].

    ``max_response_len`` is the constant of --loss-agg-mode seq_mean_token_sum_norm. ``train_actor=False``
    (the first --num-critic-only-steps rollouts) trains only the critic. ``advantage_fn``
    (--custom-advantage-function-path) replaces the estimator. Returns metrics averaged over the optimizer
    steps of this update.
    """
    kept = [[(s, r) for s, r in zip(g.samples, rs) if s.status != Status.FAILED] for g, rs in zip(groups, rewards)]
    kept = [members for members in kept if members]
    samples = [s for members in kept for s, _ in members]
    if not samples:
        return {"train/num_samples": 0.0}
    batch = collate(samples, [0.0] * len(samples), pad_id)
    num_steps = max(1, -(-len(samples) // global_batch_size))
    if trainer.needs_ref:
        batch.ref_log_probs = trainer.compute_logprobs(batch, reference=True)
    recomputed_mismatch = _set_old_log_probs(trainer, batch, samples, algorithm, num_steps)
    advantages = Advantages(batch.advantages)
    if algorithm.loss_type != "sft_loss":
        kept_rewards = [[r for _, r in m] for m in kept]
        custom = None if advantage_fn is None else (advantage_fn, AdvantageInputs(
            kept_rewards, batch, [len(s.prompt_tokens) - 1 for s in samples], [s.response_length for s in samples]))
        advantages = compute_advantages(trainer, batch, algorithm, kept_rewards, custom)
        batch.advantages = advantages.token_advantages
    if algorithm.normalize_advantages:  # over the whole rollout batch, before it is split into steps
        batch.advantages = whiten(batch.advantages, batch.loss_mask).to(batch.advantages.dtype)
    sums: dict[str, float] = defaultdict(float, advantages.metrics)
    if algorithm.loss_type != "sft_loss":  # 0 means no learning signal (observability/signal.py warns)
        sums[ADVANTAGE_ABS_MEAN] = masked_mean(batch.advantages.abs(), batch.loss_mask).item()
    if algorithm.use_tis and algorithm.loss_type == "policy_loss":
        sums["train/tis_ess"] = _mean_step_ess(batch, algorithm, global_batch_size, num_steps)
    first_step_mismatch: dict[str, float] = {}
    for step in range(num_steps):
        rows = slice(step * global_batch_size, (step + 1) * global_batch_size)
        metrics: dict[str, float] = {}
        if train_actor:
            metrics = trainer.train_step(batch.select(rows), max_len=max_response_len)
            mismatch = {key: metrics.pop(key) for key in MISMATCH_KEYS if key in metrics}
            if step == 0:  # later steps see an updated policy: only the first forward measures the mismatch
                first_step_mismatch = mismatch
        if advantages.value_batch is not None:
            metrics.update(trainer.train_critic_step(advantages.value_batch.select(rows), max_response_len))
        for key, value in metrics.items():
            sums[key] += value / num_steps
    sums.update(recomputed_mismatch if recomputed_mismatch is not None else first_step_mismatch)
    sums["train/num_samples"] = float(len(samples))
    sums["train/num_steps"] = float(num_steps)
    if not train_actor:
        sums["train/critic_only"] = 1.0
    return dict(sums)


def _set_old_log_probs(trainer, batch: TrainBatch, samples: list[Sample], algorithm: AlgorithmConfig,
                       num_steps: int) -> dict[str, float] | None:
    """Fills ``batch.old_log_probs`` where the loss needs them; returns the trainer-vs-engine mismatch metrics
    (loss.rollout_mismatch, means over trained tokens) when the trainer's old logprobs were recomputed, else None.

    Left None for one on-policy step: the loss then uses the detached current logprobs (ratio exactly 1).
    """
    if algorithm.loss_type == "sft_loss":
        return None
    if algorithm.use_rollout_logprobs or algorithm.use_tis:
        flag = "--use-rollout-logprobs" if algorithm.use_rollout_logprobs else "--use-tis"
        for sample in samples:
            if len(sample.rollout_log_probs) < len(sample.response_tokens):
                raise ValueError(f"{flag} needs the engine's logprobs, but sample {sample.index} has "
                                 f"{len(sample.rollout_log_probs)} for {len(sample.response_tokens)} response tokens")
    if algorithm.use_rollout_logprobs:
        batch.old_log_probs = batch.rollout_log_probs.clone()
        return None
    if num_steps > 1 or algorithm.use_tis:
        # Later steps of this rollout see an updated policy (and TIS compares the trainer's behaviour
        # logprobs with the engine's): freeze them before the first step.
        batch.old_log_probs = trainer.compute_logprobs(batch)
        return {key: masked_mean(gap, batch.loss_mask).item()
                for key, gap in rollout_mismatch(batch.old_log_probs, batch.rollout_log_probs).items()}
    return None


def _mean_step_ess(batch: TrainBatch, algorithm: AlgorithmConfig, global_batch_size: int, num_steps: int) -> float:
    """``train/tis_ess``: the effective sample size fraction of the importance weights over the trained tokens
    of each optimizer step, averaged over the steps.

    Why here: the ESS is a ratio of sums over the whole step, so per-micro-batch values do not add up; the
    old and rollout logprobs are both known before the first step, so the weights can be computed up front.
    """
    total = 0.0
    for step in range(num_steps):
        rows = batch.select(slice(step * global_batch_size, (step + 1) * global_batch_size))
        weight, _ = importance_weight(algorithm.tis_mode, rows.old_log_probs, rows.rollout_log_probs,
                                      rows.loss_mask, algorithm.tis_clip_low, algorithm.tis_clip)
        total += effective_sample_size(weight, rows.loss_mask)
    return total / num_steps
