"""The main loops. ``train_sync`` runs rollout -> reward -> train -> weight sync -> eval, one after another;
``train_async`` generates the next steps' groups while the trainer trains (the producer in rollout/streaming.py),
taking each batch within the staleness bound. ``train`` picks one by --async. The parts are built by
orchestration/builder.py and placed in this process or on Ray actors behind orchestration/pools.py."""

from __future__ import annotations

import asyncio

from sluice.observability.step_metrics import StageTimer, idle_fractions
from sluice.orchestration.run import Run
from sluice.rollout.finish import FinishedBatch


def train(run: Run) -> None:
    if run.config.sync.async_train:
        run.run_async(train_async(run))
    else:
        train_sync(run)


def train_sync(run: Run) -> None:
    if run.schedule.eval_before_train():
        run.log.record(run.schedule.start_rollout,
                       {**run.sft_eval.losses(), **run.evaluator.evaluate(run.schedule.start_rollout)})
    for rollout_id in run.schedule.steps:
        timer = StageTimer()
        with timer("rollout"):
            run.offload.memory_for("rollout")  # --offload-*: colocated pools take turns on the devices
            batch = run.batches.generate(rollout_id)  # generated and scored (or replayed), then finished
        metrics = dict(batch.metrics)
        if run.trainer is not None:  # not with --debug-rollout-only
            with timer("train"):
                run.offload.memory_for("train")
                metrics.update(train_step(run, batch, rollout_id))
                if run.schedule.ref_update_due(rollout_id):
                    run.trainer.update_reference()
            push = run.schedule.push_due(rollout_id)  # every step; SFT from data: only before an eval
            with timer("sync"):
                if push:
                    run.offload.memory_for("sync")
                metrics.update(run.weights.sync(version=rollout_id + 1, push=push))
        if run.schedule.eval_due(rollout_id):
            with timer("eval"):
                metrics.update(run.sft_eval.losses())  # a trainer forward pass, before it makes room for the engines
                run.offload.memory_for("eval")
                metrics.update(run.evaluator.evaluate(rollout_id + 1))
        if run.schedule.save_due(rollout_id):  # with the step's metrics: a kill before the log loses none
            with timer("save"):
                run.checkpoints.save(rollout_id, run.log.state_dict(),
                                     step_metrics={**metrics, **timer.metrics(metrics)})
        step = timer.metrics(metrics)
        step.update(idle_fractions(timer.seconds.get("rollout", 0.0), timer.seconds.get("train"),
                                   step["perf/step_time_s"]))
        run.log.record(rollout_id + 1, {**metrics, **step})


async def train_async(run: Run) -> None:
    if run.schedule.eval_before_train():
        run.log.record(run.schedule.start_rollout, await run.evaluator.evaluate_async(run.schedule.start_rollout))
    producer = run.batches.start_producer(num_steps=len(run.schedule.steps))
    try:
        for rollout_id in run.schedule.steps:
            timer = StageTimer()
            with timer("wait"):  # the trainer idles until the buffer has a batch within the staleness bound
                batch = await run.batches.take(producer, rollout_id)
            metrics = dict(batch.metrics)
            with timer("train"):  # the engines keep generating meanwhile
                metrics.update(await asyncio.to_thread(train_step, run, batch, rollout_id))
                if run.schedule.ref_update_due(rollout_id):
                    run.trainer.update_reference()
            if run.schedule.sync_due(rollout_id):
                with timer("sync"):
                    metrics.update(await producer.around_update(run.weights.push(version=rollout_id + 1)))
            if run.schedule.eval_due(rollout_id):
                with timer("eval"):
                    metrics.update(await run.evaluator.evaluate_async(rollout_id + 1))
            if run.schedule.save_due(rollout_id):  # on the loop's thread: the buffer holds still while it is saved
                with timer("save"):
                    run.checkpoints.save(rollout_id, run.log.state_dict(),
                                         step_metrics={**metrics, **timer.metrics(metrics)})
            step = timer.metrics(metrics)
            step.update(producer.step_metrics(step["perf/step_time_s"]))
            step.update(idle_fractions(None, timer.seconds["train"], step["perf/step_time_s"]))
            run.log.record(rollout_id + 1, {**metrics, **step})
    finally:
        await producer.stop()


def train_step(run: Run, batch: FinishedBatch, rollout_id: int) -> dict[str, float]:
    """The policy (and critic) update on one batch; the first --num-critic-only-steps train the critic only."""
    metrics = run.trainer.train(batch.groups, batch.rewards, train_actor=run.schedule.trains_actor(rollout_id))
    metrics["train/num_tokens"] = batch.num_tokens
    return metrics
