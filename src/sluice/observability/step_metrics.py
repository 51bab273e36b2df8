"""Per-step metrics of the loop itself: stage times and throughput (``StageTimer``), pool idle fractions and
peak GPU memory. The metrics of a rollout batch are computed where the batch is finished (rollout/metrics.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager

from sluice.observability.keys import STAGE_TOKENS


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
