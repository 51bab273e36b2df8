"""The main loops. ``train_sync`` runs rollout -> reward -> train -> weight sync -> eval, one after another."""

from __future__ import annotations

from sluice.observability.step_metrics import StageTimer
from sluice.orchestration.local_run import LocalRun


def train_sync(run: LocalRun) -> None:
    if run.eval_before_train():
        run.log(run.start_rollout, run.evaluate())
    for rollout_id in range(run.start_rollout, run.num_rollout):
        timer = StageTimer()
        with timer("rollout"):
            groups = run.generate()  # generation and rewards (or a replay of saved rollouts)
        metrics = run.rollout_metrics(groups, rollout_id)
        if run.trains:  # not with --debug-rollout-only
            with timer("train"):
                metrics.update(run.train(groups, rollout_id))
                run.maybe_update_reference(rollout_id)
            with timer("sync"):
                run.sync_weights(version=rollout_id + 1)
        if run.eval_due(rollout_id):
            with timer("eval"):
                metrics.update(run.evaluate())
        if run.save_due(rollout_id):  # the step's metrics go into the checkpoint: a kill before the log loses none
            with timer("save"):
                run.save(rollout_id, step_metrics={**metrics, **timer.metrics(metrics)})
        run.log(rollout_id + 1, {**metrics, **timer.metrics(metrics)})
