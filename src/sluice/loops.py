"""The main loops. ``train_sync`` runs rollout -> reward -> train -> weight sync -> eval, one after another."""

from __future__ import annotations

import time
from contextlib import contextmanager

from sluice.orchestration.local_run import LocalRun


class StageTimer:
    """Wall time per stage of one step, reported as ``perf/<stage>_time_s``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {**{f"perf/{stage}_time_s": s for stage, s in self.seconds.items()},
                "perf/step_time_s": sum(self.seconds.values())}


def train_sync(run: LocalRun) -> None:
    if run.eval_before_train():
        run.log(run.start_rollout, run.evaluate())
    for rollout_id in range(run.start_rollout, run.num_rollout):
        timer = StageTimer()
        with timer("rollout"):
            groups = run.generate()  # generation and rewards
        with timer("train"):
            metrics = run.train(groups, rollout_id)
        with timer("sync"):
            run.sync_weights(version=rollout_id + 1)
            run.maybe_update_reference(rollout_id)
        if run.eval_due(rollout_id):
            with timer("eval"):
                metrics.update(run.evaluate())
        if run.save_due(rollout_id):
            with timer("save"):
                run.save(rollout_id)
        metrics.update(run.rollout_metrics(groups))
        metrics["perf/rollout_tokens_per_s"] = metrics["rollout/response_len_mean"] * metrics[
            "rollout/num_samples"] / max(timer.seconds["rollout"], 1e-9)
        run.log(rollout_id + 1, {**metrics, **timer.metrics()})
