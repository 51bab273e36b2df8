"""The metrics of a finished rollout batch: rewards, accuracy, response lengths, truncation and failure rates,
staleness, the share of groups with no reward spread, and the per-sample numbers a generate function reports (tool calls, turns)."""

from __future__ import annotations

import statistics

import numpy as np

from sluice.rollout.generate import SAMPLE_METRICS_KEY
from sluice.types import SampleGroup, Status

PERCENTILES = (50, 90, 99)


def distribution(name: str, values: list[float]) -> dict[str, float]:
    """min, max, std and percentiles (linear interpolation) of ``values`` as ``name_<stat>``."""
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    out = {f"{name}_min": float(array.min()), f"{name}_max": float(array.max()), f"{name}_std": float(array.std())}
    out.update({f"{name}_p{q}": float(np.percentile(array, q)) for q in PERCENTILES})
    return out


def accuracy(rewards: list[float], threshold: float) -> float:
    """The fraction of ``rewards`` at or above ``threshold`` (--eval-accuracy-threshold); 0.0 for none."""
    return sum(r >= threshold for r in rewards) / len(rewards) if rewards else 0.0


def rollout_metrics(groups: list[SampleGroup], rewards: list[list[float]], policy_version: int = 0,
                    overlong_shaped: bool = False, prefix: str = "rollout",
                    accuracy_threshold: float = 1.0) -> dict[str, float]:
    """Statistics of a batch's samples; ``rewards`` are their scalar rewards, group by group.

    accuracy: the fraction of samples with reward >= ``accuracy_threshold`` (--eval-accuracy-threshold, the eval
    definition). staleness: how many weight
    updates behind ``policy_version`` (the version being trained) the weights that generated a sample were,
    counted from its oldest generation call; always 0 in the synchronous loop. ``overlong_shaped``: the rewards
    carry DAPO's overlong penalty (--overlong-buffer-len), whose mean is reported.
    """
    samples = [s for g in groups for s in g.samples]
    flat_rewards = [r for rs in rewards for r in rs]
    lengths = [s.response_length for s in samples]
    out = {
        f"{prefix}/reward_mean": statistics.fmean(flat_rewards) if flat_rewards else 0.0,
        f"{prefix}/response_len_mean": statistics.fmean(lengths) if lengths else 0.0,
        f"{prefix}/truncated_frac": sum(s.status == Status.TRUNCATED for s in samples) / max(len(samples), 1),
        f"{prefix}/failed_frac": sum(s.status == Status.FAILED for s in samples) / max(len(samples), 1),
        f"{prefix}/num_samples": float(len(samples)),
    }
    if overlong_shaped:
        penalties = [s.metadata["overlong_penalty"] for s in samples if "overlong_penalty" in s.metadata]
        out[f"{prefix}/overlong_penalty_mean"] = statistics.fmean(penalties) if penalties else 0.0
    out.update(_reported_metrics(groups, prefix))
    out.update(distribution(f"{prefix}/response_len", lengths))
    out[f"{prefix}/response_tokens"] = float(sum(lengths))
    if flat_rewards:
        out[f"{prefix}/accuracy"] = accuracy(flat_rewards, accuracy_threshold)
        out[f"{prefix}/reward_std"] = float(np.std(flat_rewards))
    out.update(_staleness_metrics(groups, policy_version, prefix))
    if groups:
        out[f"{prefix}/zero_std_group_fraction"] = zero_std_group_fraction(groups, rewards)
    return out


def zero_std_group_fraction(groups: list[SampleGroup], rewards: list[list[float]]) -> float:
    """The fraction of groups whose trained (not failed) samples all have the same reward.

    Such a group gives every sample the same group-relative advantage (0 for GRPO and its kin), so it teaches
    the policy nothing; at 1.0 no group does. A group of one sample, or with every sample failed, counts as
    equal: it has no spread either.
    """
    equal = 0
    for group, group_rewards in zip(groups, rewards, strict=True):
        kept = {r for s, r in zip(group.samples, group_rewards, strict=True) if s.status != Status.FAILED}
        equal += len(kept) <= 1
    return equal / len(groups)


def _reported_metrics(groups: list[SampleGroup], prefix: str) -> dict[str, float]:
    """Per-sample numbers a generate function reports, averaged over the samples that have them."""
    reported: dict[str, list[float]] = {}
    for sample in (s for g in groups for s in g.samples):
        for key, value in sample.metadata.get(SAMPLE_METRICS_KEY, {}).items():
            reported.setdefault(key, []).append(float(value))
    return {f"{prefix}/{key}": statistics.fmean(values) for key, values in reported.items()}


def _staleness_metrics(groups: list[SampleGroup], policy_version: int, prefix: str) -> dict[str, float]:
    staleness = [policy_version - min(s.weight_versions) for g in groups for s in g.samples if s.weight_versions]
    out = {f"{prefix}/staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
           f"{prefix}/staleness_max": float(max(staleness)) if staleness else 0.0}
    for lag in sorted(set(staleness)):  # the distribution: the fraction of samples this many versions behind
        out[f"{prefix}/staleness_frac_{lag}"] = staleness.count(lag) / len(staleness)
    return out
