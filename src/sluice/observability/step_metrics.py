"""Per-step metrics computed from a rollout's groups and the stage timer: length distribution, accuracy,
staleness, throughput. Reward means, truncation and failure rates come from the rollout manager."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np

from sluice.observability.keys import STAGE_TOKENS
from sluice.types import SampleGroup

PERCENTILES = (50, 90, 99)


def distribution(name: str, values: list[float]) -> dict[str, float]:
    """min, max, std and percentiles (linear interpolation) of ``values`` as ``name_<stat>``."""
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    out = {f"{name}_min": float(array.min()), f"{name}_max": float(array.max()), f"{name}_std": float(array.std())}
    out.update({f"{name}_p{q}": float(np.percentile(array, q)) for q in PERCENTILES})
    return out


def response_metrics(groups: list[SampleGroup], rewards: list[list[float]], policy_version: int,
                     prefix: str = "rollout") -> dict[str, float]:
    """Length distribution, token count, accuracy and staleness of a rollout's samples.

    accuracy: the fraction of samples with reward >= 1 (the eval definition). staleness: how many weight
    updates behind ``policy_version`` (the version being trained) the weights that generated a sample were,
    counted from its oldest generation call; always 0 in the synchronous loop.
    """
    samples = [s for g in groups for s in g.samples]
    flat_rewards = [r for rs in rewards for r in rs]
    lengths = [s.response_length for s in samples]
    out = distribution(f"{prefix}/response_len", lengths)
    out[f"{prefix}/response_tokens"] = float(sum(lengths))
    if flat_rewards:
        out[f"{prefix}/accuracy"] = sum(r >= 1.0 for r in flat_rewards) / len(flat_rewards)
        out[f"{prefix}/reward_std"] = float(np.std(flat_rewards))
    staleness = [policy_version - min(s.weight_versions) for s in samples if s.weight_versions]
    out[f"{prefix}/staleness_mean"] = float(np.mean(staleness)) if staleness else 0.0
    out[f"{prefix}/staleness_max"] = float(max(staleness)) if staleness else 0.0
    for lag in sorted(set(staleness)):  # the distribution: the fraction of samples this many versions behind
        out[f"{prefix}/staleness_frac_{lag}"] = staleness.count(lag) / len(staleness)
    return out


def peak_gpu_memory() -> dict[str, float]:
    """Peak GPU memory allocated by torch in this process since the previous call (GiB); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"perf/peak_gpu_memory_gib": peak}


def idle_fractions(rollout_s: float | None, train_s: float | None, step_s: float) -> dict[str, float]:
    """The fraction of the step each pool spent not doing its work (generating; training). None: not known here
    (the async loop's producer measures the rollout pool's own idle time)."""
    out = {}
    for pool, busy in (("rollout", rollout_s), ("train", train_s)):
        if busy is not None and step_s > 0:
            out[f"perf/{pool}_idle_frac"] = max(0.0, 1.0 - busy / step_s)
    return out


class StageTimer:
    """Wall time per stage of one step, reported as ``perf/<stage>_time_s`` with tokens/s where counted."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = time.perf_counter() - start

    def metrics(self, step_metrics: Mapping[str, float] = {}) -> dict[str, float]:
        """Stage times, the step time, and ``perf/<stage>_tokens_per_s`` for the stages whose token count
        (keys.STAGE_TOKENS) is in ``step_metrics``."""
        out = {f"perf/{stage}_time_s": s for stage, s in self.seconds.items()}
        out["perf/step_time_s"] = sum(self.seconds.values())
        for stage, key in STAGE_TOKENS.items():
            if stage in self.seconds and step_metrics.get(key) is not None:
                out[f"perf/{stage}_tokens_per_s"] = step_metrics[key] / max(self.seconds[stage], 1e-9)
        return out
