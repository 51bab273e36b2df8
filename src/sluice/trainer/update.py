"""One policy update from a rollout's groups: advantages -> TrainBatch -> logprob passes -> optimizer steps."""

from __future__ import annotations

from collections import defaultdict

from sluice.config import AlgorithmConfig
from sluice.trainer.batching import collate, group_advantages
from sluice.types import SampleGroup, Status


def update_policy(trainer, groups: list[SampleGroup], algorithm: AlgorithmConfig, rewards: list[list[float]],
                  global_batch_size: int, pad_id: int) -> dict[str, float]:
    """Train on every non-failed sample; ``rewards[g][i]`` is the scalar reward of groups[g].samples[i].

    Returns metrics averaged over the optimizer steps of this update.
    """
    kept = [[(s, r) for s, r in zip(g.samples, rs) if s.status != Status.FAILED] for g, rs in zip(groups, rewards)]
    kept = [members for members in kept if members]
    samples = [s for members in kept for s, _ in members]
    if not samples:
        return {"train/num_samples": 0.0}
    advantages = group_advantages(algorithm.advantage_estimator, [[r for _, r in m] for m in kept],
                                  algorithm.disable_grpo_std_normalization)
    batch = collate(samples, advantages, pad_id)
    num_steps = max(1, -(-len(samples) // global_batch_size))
    if trainer.needs_ref:
        batch.ref_log_probs = trainer.compute_logprobs(batch, reference=True)
    if num_steps > 1 and algorithm.loss_type == "policy_loss":
        # Later steps of this rollout see an updated policy: freeze the behaviour logprobs before the first.
        batch.old_log_probs = trainer.compute_logprobs(batch)
    sums: dict[str, float] = defaultdict(float)
    for step in range(num_steps):
        rows = slice(step * global_batch_size, (step + 1) * global_batch_size)
        for key, value in trainer.train_step(batch.select(rows)).items():
            sums[key] += value / num_steps
    sums["train/num_samples"] = float(len(samples))
    sums["train/num_steps"] = float(num_steps)
    return dict(sums)
