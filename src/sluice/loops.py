"""The main loops. ``train_sync`` runs rollout -> reward -> train -> weight sync -> eval, one after another;
``train_async`` generates the next steps' groups while the trainer trains (the producer in rollout/streaming.py),
taking each batch within the staleness bound. ``train`` picks one by --async."""

from __future__ import annotations

import asyncio

from sluice.observability.step_metrics import StageTimer, idle_fractions
from sluice.orchestration.local_run import LocalRun


def train(run: LocalRun) -> None:
    if run.config.sync.async_train:
        run.run_async(train_async(run))
    else:
        train_sync(run)


def train_sync(run: LocalRun) -> None:
    if run.eval_before_train():
        run.log(run.start_rollout, run.evaluate())
    for rollout_id in range(run.start_rollout, run.num_rollout):
        timer = StageTimer()
        with timer("rollout"):
            run.memory_for("rollout")  # --offload-*: colocated pools take turns on the devices
            groups = run.generate()  # generation and rewards (or a replay of saved rollouts)
        metrics = run.rollout_metrics(groups, rollout_id)
        if run.trains:  # not with --debug-rollout-only
            with timer("train"):
                run.memory_for("train")
                metrics.update(run.train(groups, rollout_id))
                run.maybe_update_reference(rollout_id)
            with timer("sync"):
                run.memory_for("sync")
                metrics.update(run.sync_weights(version=rollout_id + 1))
        if run.eval_due(rollout_id):
            with timer("eval"):
                run.memory_for("rollout")
                metrics.update(run.evaluate())
        if run.save_due(rollout_id):  # the step's metrics go into the checkpoint: a kill before the log loses none
            with timer("save"):
                run.save(rollout_id, step_metrics={**metrics, **timer.metrics(metrics)})
        step = timer.metrics(metrics)
        step.update(idle_fractions(timer.seconds.get("rollout", 0.0), timer.seconds.get("train"),
                                   step["perf/step_time_s"]))
        run.log(rollout_id + 1, {**metrics, **step})


async def train_async(run: LocalRun) -> None:
    if run.eval_before_train():
        run.log(run.start_rollout, await run.evaluate_async())
    producer = run.start_producer()
    try:
        for rollout_id in range(run.start_rollout, run.num_rollout):
            timer = StageTimer()
            with timer("wait"):  # the trainer idles until the buffer has a batch within the staleness bound
                groups = await run.take_groups(producer, rollout_id)
            metrics = run.rollout_metrics(groups, rollout_id)
            with timer("train"):  # the engines keep generating meanwhile
                metrics.update(await asyncio.to_thread(run.train, groups, rollout_id))
                run.maybe_update_reference(rollout_id)
            if run.sync_due(rollout_id):
                with timer("sync"):
                    metrics.update(await producer.around_update(run.push_weights(version=rollout_id + 1)))
            if run.eval_due(rollout_id):
                with timer("eval"):
                    metrics.update(await run.evaluate_async())
            if run.save_due(rollout_id):  # on the loop's thread: the buffer holds still while it is saved
                with timer("save"):
                    run.save(rollout_id, step_metrics={**metrics, **timer.metrics(metrics)})
            step = timer.metrics(metrics)
            step.update(producer.step_metrics(step["perf/step_time_s"]))
            step.update(idle_fractions(None, timer.seconds["train"], step["perf/step_time_s"]))
            run.log(rollout_id + 1, {**metrics, **step})
    finally:
        await run.stop_producer(producer)
