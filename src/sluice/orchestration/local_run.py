"""A run on one machine, in one process: engine, rollout manager, trainer, data, metrics.

``LocalRun`` owns the parts and gives the loop one verb per stage; the loop itself lives in loops.py. Debug
modes leave parts out: --debug-rollout-only builds no trainer, --debug-train-only starts no engine and
replays rollouts saved by --save-debug-rollout-data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
from pathlib import Path

from transformers.utils import logging as hf_logging

from sluice.buffer import DataBuffer
from sluice.checkpoint.rollout_data import load_rollout_data, rollout_data_path, save_rollout_data
from sluice.config import Config, ConfigError, config_to_dict
from sluice.data import PromptSource, load_prompt_samples
from sluice.models.tokenizer import load_tokenizer
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.local_engine import LocalEngine
from sluice.observability.plots import plot_curves
from sluice.observability.progress import ProgressReporter
from sluice.observability.step_metrics import peak_gpu_memory, response_metrics
from sluice.observability.trackers import Trackers
from sluice.orchestration.checkpointing import RunCheckpoints
from sluice.orchestration.oom import explain_oom, raise_if_engine_ran_out
from sluice.orchestration.resume import read_model_shape
from sluice.orchestration.hooks import load_hooks
from sluice.orchestration.rollout_setup import build_rollout, pick_trained_groups, prompt_data_config
from sluice.rollout.dynamic_sampling import SamplingOutcome, sample_filtered_groups
from sluice.rollout.evaluation import EvalRequest
from sluice.rollout.failures import RolloutFailed, check_failure_budget  # noqa: F401 (cli.py imports it from here)
from sluice.rollout.manager import RolloutManager, rollout_metrics
from sluice.rollout.step import RolloutRequest
from sluice.rollout.streaming import LocalBufferHandle, StreamingRollout
from sluice.sync.factory import make_weight_sync
from sluice.trainer.torch_backend import TorchTrainer
from sluice.trainer.update import update_policy
from sluice.types import SampleGroup, SamplingParams, Status


class LocalRun:
    def __init__(self, config: Config, log=print):
        hf_logging.disable_progress_bar()
        self.config, self.log_line = config, log
        self._loop = asyncio.new_event_loop()  # the run's one event loop: see run_async
        checkpoint = config.model.hf_checkpoint
        _check_checkpoint_dir("--hf-checkpoint", checkpoint)
        if config.model.ref_load:
            _check_checkpoint_dir("--ref-load", config.model.ref_load)
        self.hooks = load_hooks(config)  # every plug-in, checked before anything heavy loads
        self.last_sampling: SamplingOutcome | None = None  # counts of the latest dynamic-sampling rollout
        self.last_step_metrics: dict[str, float] = {}  # from a --rollout-function-path and --buffer-filter-path
        self.gateway = None
        self.tokenizer = load_tokenizer(checkpoint)
        self.model_shape = read_model_shape(checkpoint)
        data = prompt_data_config(config, self.hooks)
        samples = []
        if config.data.prompt_data is not None:
            samples, report = load_prompt_samples(config.data.prompt_data, data, self.tokenizer)
            self._report_load(config.data.prompt_data, report)
        if self.hooks.data_source is not None:
            self.source = self.hooks.data_source(samples, config.data.rollout_seed, data, self.tokenizer,
                                                 self.hooks.slime_args)
        else:
            self.source = PromptSource(samples, config.data.rollout_shuffle, config.data.rollout_seed)
        # Every rollout draws its prompts through the buffer, and checkpoints save the buffer (cursor included).
        self.buffer = self._make_buffer(config)
        self.eval_sets = {}
        for name, path in config.eval_sets:
            eval_samples, eval_report = load_prompt_samples(path, data, self.tokenizer)
            self._report_load(path, eval_report)
            self.eval_sets[name] = eval_samples
        self.engine: LocalEngine | None = None
        self.weight_sync = None  # made at the first push (see _push)
        self._on_device = {"engines": True, "trainer": True}  # see memory_for
        self.gateway = None
        self.client, context_len = None, 0
        try:
            if not config.debug.debug_train_only:
                self.client, context_len = self._start_engines(config, checkpoint)
            self._start(config, checkpoint, context_len)
        except BaseException:
            if self.gateway is not None:
                self.gateway.stop()
            self._close_connections()
            self._stop_pools()  # an engine's worker thread (or actor) would otherwise outlive a failed start
            self._close_loop()
            raise

    # ---- the parts a distributed run (ray_run.RayRun) places elsewhere ----------------------------------------
    def _make_buffer(self, config: Config):
        return DataBuffer(self.source, config.rollout.n_samples_per_prompt, config.staleness_bound,
                          max_held_groups=held_groups(config))

    def _start_engines(self, config: Config, checkpoint: str):
        """The engine client of the rollout, and the engines' context length."""
        with explain_oom(config, "engine start"):
            self.engine = LocalEngine(checkpoint, config.engine)
        return InProcessClient(self.engine), self.engine.context_len

    def _start_trainer(self, config: Config, checkpoint: str):
        with explain_oom(config, "train"):
            return TorchTrainer(checkpoint, config.train, config.algorithm, config.rollout.rollout_temperature,
                                config.model.ref_load, custom_loss=self.hooks.loss)

    def _update_policy(self, groups: list[SampleGroup], rewards: list[list[float]], train_actor: bool) -> dict:
        skipped_before = self.trainer.guard.num_skipped
        with explain_oom(self.config, "train"):
            metrics = update_policy(self.trainer, groups, self.config.algorithm, rewards,
                                    self.config.global_batch_size, self.tokenizer.pad_token_id or 0,
                                    self.config.rollout.rollout_max_response_len, train_actor=train_actor,
                                    advantage_fn=self.hooks.advantage)
        metrics["train/nonfinite_skipped_steps"] = float(self.trainer.guard.num_skipped - skipped_before)
        metrics["train/nonfinite_skipped_total"] = float(self.trainer.guard.num_skipped)
        metrics.update(peak_gpu_memory())  # engine and trainer together: they share this process
        return metrics

    async def _push(self, version: int) -> dict[str, float]:
        """The trainer's weights to the engine, as ``version`` (--weight-sync-method: in_process or disk)."""
        if self.weight_sync is None:
            self.weight_sync = make_weight_sync(self.config.sync, [self.engine], device=self.trainer.device,
                                                run_dir=self.config.logging.run_dir)
        report = await self.weight_sync.push(self.trainer.named_weights(), version)
        return {"sync/seconds": report.seconds, "sync/bytes": float(report.num_bytes)}

    def memory_for(self, stage: str) -> None:
        """--offload-train / --offload-rollout: hand the shared devices to the stage about to run. "train": the
        engines free their KV cache and weights, the trainer comes back; "sync": the engines come back (the
        trainer still holds its weights, which it sends); "rollout": the trainer moves to host memory."""
        cluster = self.config.cluster
        offload_rollout = (cluster.offload or cluster.offload_rollout) and self.client is not None
        offload_train = (cluster.offload or cluster.offload_train) and self.trainer is not None
        wanted = {"train": (not offload_rollout, True), "sync": (True, True),
                  "rollout": (True, not offload_train)}[stage]
        engines_on, trainer_on = wanted
        if engines_on != self._on_device["engines"] and offload_rollout:
            self._move_engines(to_device=engines_on)
            self._on_device["engines"] = engines_on
        if trainer_on != self._on_device["trainer"] and offload_train:
            self.trainer.onload() if trainer_on else self.trainer.offload()
            self._on_device["trainer"] = trainer_on

    def _move_engines(self, to_device: bool) -> None:
        self.engine.resume_memory() if to_device else self.engine.release_memory()

    def _engine_recovery(self):
        """What the rollout calls when a request lost its engine: nothing here (an engine in this process is
        not lost without the process); RayRun restarts engine actors."""
        return None

    def buffer_handle(self):
        """The buffer as the async producer calls it."""
        return LocalBufferHandle(self.buffer)

    def _stop_pools(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def _start(self, config: Config, checkpoint: str, context_len: int) -> None:
        self.rollout, self.gateway = build_rollout(config, self.hooks, self.client, self.tokenizer, context_len)
        self.rollout.recover_engines = self._engine_recovery()
        self.trainer = self._start_trainer(config, checkpoint) if self.trains else None
        self.num_rollout = config.rollout.num_rollout or self.source.num_rollouts_for_epochs(
            config.rollout.num_epoch, config.rollout.rollout_batch_size)
        self.checkpoints = RunCheckpoints(config, self.tokenizer, self.model_shape, self.log_line)
        resumed = self._maybe_resume()
        self.start_rollout = resumed["rollout_id"] + 1 if resumed else 0
        self.num_rollouts_done = self.start_rollout
        # A resume drops the records past its checkpoint; --load with nothing saved yet drops a failed attempt's.
        resume_after_step = self.start_rollout if resumed else (-1 if config.checkpoint.load else None)
        self.trackers = Trackers(config.logging, config_to_dict(config), resume_after_step,
                                 wandb_run_id=(resumed or {}).get("trackers", {}).get("wandb_run_id"))
        self.progress = ProgressReporter(self.num_rollout, enabled=config.logging.progress_bar,
                                         initial_step=self.start_rollout)
        unlogged = (resumed or {}).get("step_metrics")
        metrics_file = self.trackers.jsonl
        if unlogged is not None and metrics_file.continues_file and metrics_file.last_step < self.start_rollout:
            self.trackers.log(unlogged, step=self.start_rollout)  # the run was killed after its save, before its log

    def run_async(self, coroutine):
        """Run ``coroutine`` to its end on the run's event loop. One loop for the whole run, so engine clients keep
        their connections (an HTTP client is bound to the loop it was made on) and locks stay meaningful."""
        return self._loop.run_until_complete(coroutine)

    @property
    def trains(self) -> bool:
        """Whether this run trains (everything but --debug-rollout-only)."""
        return not self.config.debug.debug_rollout_only

    def _report_load(self, path: str, report) -> None:
        if report.num_dropped_too_long:
            self.log_line(f"{path}: dropped {report.num_dropped_too_long} of {report.num_rows} prompts longer "
                          f"than --rollout-max-prompt-len {self.config.data.rollout_max_prompt_len}")

    # ---- stages -------------------------------------------------------------------------------------
    def generate(self) -> list[SampleGroup]:
        """The next rollout's scored groups: generated, or replayed with --load-debug-rollout-data."""
        rollout_id = self.num_rollouts_done
        self.num_rollouts_done += 1
        debug = self.config.debug
        if debug.load_debug_rollout_data:
            groups = self._replay(rollout_id)
        else:
            with explain_oom(self.config, "rollout"):
                groups = self._generate(rollout_id)
            raise_if_engine_ran_out(groups, self.config)
            check_failure_budget(groups, self.config.rollout.max_failed_sample_ratio)
        if debug.save_debug_rollout_data:
            save_rollout_data(rollout_data_path(debug.save_debug_rollout_data, rollout_id), rollout_id, groups)
        return groups

    def _generate(self, rollout_id: int) -> list[SampleGroup]:
        rollout = self.config.rollout
        first_index = rollout_id * self.config.samples_per_rollout  # Sample.index: unique in the run
        total = None if rollout.dynamic_sampling else self.config.samples_per_rollout
        with self.progress.stage("rollout", total=total) as bar:
            manager = _counting(self.rollout, bar)
            self.last_step_metrics = {}
            request = RolloutRequest(rollout_id, rollout.rollout_batch_size, rollout.n_samples_per_prompt,
                                     self.sampling_params(), first_index, self.buffer, manager)
            if self.hooks.rollout is not None:
                output = self.run_async(self.hooks.rollout(request))
                groups, self.last_step_metrics = output.groups, dict(output.metrics)
            elif rollout.dynamic_sampling:
                self.last_sampling = self.run_async(sample_filtered_groups(
                    manager, self.buffer, rollout.rollout_batch_size,
                    rollout.over_sampling_batch_size or rollout.rollout_batch_size, rollout.n_samples_per_prompt,
                    self.sampling_params(), self.hooks.group_filter, first_index=first_index))
                self._report_short_batch(self.last_sampling)
                groups = self.last_sampling.groups
            else:
                groups = self._generate_through_buffer(manager)
        groups, dropped = pick_trained_groups(self.hooks, groups, request)
        self.last_step_metrics.update(dropped)
        return groups

    def _generate_through_buffer(self, manager: RolloutManager) -> list[SampleGroup]:
        """One step's groups: handed out by the buffer, generated, put back, and taken within the staleness bound.
        A group aborted from outside goes back to the buffer and is generated again, so no prompt is lost."""
        num_groups = self.config.rollout.rollout_batch_size

        async def generate_all() -> None:
            gates = manager.new_gates()
            pending = self.buffer.get_prompt_groups(num_groups)
            while pending:
                done = await asyncio.gather(*(manager.continue_group(g, self.sampling_params(), gates)
                                              for g in pending))
                aborted = [g for g in done if any(s.status == Status.ABORTED for s in g.samples)]
                self.buffer.put_finished([g for g in done if all(g is not a for a in aborted)])
                if aborted:
                    self.buffer.requeue(aborted)
                pending = self.buffer.get_prompt_groups(len(aborted)) if aborted else []

        self.run_async(generate_all())
        groups = self.buffer.take_train_groups(num_groups, trainer_version=self.buffer.weight_version)
        groups.sort(key=lambda g: g.group_id)
        _number_groups(groups)
        return groups

    def _replay(self, rollout_id: int) -> list[SampleGroup]:
        """The groups --save-debug-rollout-data wrote for ``rollout_id`` (the prompt cursor does not move)."""
        template = self.config.debug.load_debug_rollout_data
        try:
            return load_rollout_data(rollout_data_path(template, rollout_id),
                                     rollout_id if "{rollout_id}" in template else None)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--load-debug-rollout-data: {error}") from error

    def _report_short_batch(self, outcome: SamplingOutcome) -> None:
        target = self.config.rollout.rollout_batch_size
        if outcome.num_passed_groups < target:
            self.log_line(f"dynamic sampling: {outcome.num_passed_groups} of {target} groups passed the filter "
                          f"in {outcome.num_generation_rounds} rounds; training on {len(outcome.groups)}")

    def train(self, groups: list[SampleGroup], rollout_id: int) -> dict[str, float]:
        """Update the policy (and critic) on a rollout; the first --num-critic-only-steps train the critic only."""
        try:
            rewards = [self.rollout.rewards(g) for g in groups]
        except (ValueError, KeyError) as error:  # dict rewards without (or with a wrong) --reward-key
            raise ConfigError(f"--reward-key: {error}") from error
        metrics = self._update_policy(groups, rewards,
                                      train_actor=rollout_id >= self.config.algorithm.num_critic_only_steps)
        metrics["train/num_tokens"] = float(sum(len(s.tokens) for g in groups for s in g.samples
                                                if s.status != Status.FAILED))
        return metrics

    # ---- the async loop's verbs (called on its event loop) --------------------------------------------------
    def start_producer(self) -> StreamingRollout:
        """The producer that keeps the engine generating; it stops once the run's remaining steps are covered."""
        rollout = self.config.rollout
        producer = StreamingRollout(
            self.rollout, self.buffer_handle(), self.sampling_params(),
            groups_to_train=(self.num_rollout - self.start_rollout) * rollout.rollout_batch_size,
            partial_rollout=rollout.partial_rollout, mask_offpolicy=rollout.mask_offpolicy_in_partial_rollout,
            group_filter=self.hooks.group_filter)
        producer.start()
        return producer

    async def stop_producer(self, producer: StreamingRollout) -> None:
        await producer.stop()

    async def take_groups(self, producer: StreamingRollout, rollout_id: int) -> list[SampleGroup]:
        """The batch of step ``rollout_id``: finished groups at most --max-staleness versions behind it."""
        self.num_rollouts_done = rollout_id + 1
        groups = await producer.take(self.config.rollout.rollout_batch_size, trainer_version=rollout_id)
        _number_groups(groups)
        raise_if_engine_ran_out(groups, self.config)
        check_failure_budget(groups, self.config.rollout.max_failed_sample_ratio)
        if self.config.debug.save_debug_rollout_data:
            save_rollout_data(rollout_data_path(self.config.debug.save_debug_rollout_data, rollout_id), rollout_id,
                              groups)
        return groups

    def sync_due(self, rollout_id: int) -> bool:
        """Weights go to the engines every --update-weights-interval steps, and after the last one."""
        return self._due(self.config.sync.update_weights_interval, rollout_id)

    async def push_weights(self, version: int) -> dict[str, float]:
        """The async loop's weight sync: the engines take the weights between their steps; the buffer then hands
        out groups under the new version. Returns sync metrics (time, bytes) where the method reports them."""
        metrics = await self._push(version) if self.client is not None else {}
        await self.buffer_handle().call("set_weight_version", version)
        return metrics

    def maybe_update_reference(self, rollout_id: int) -> None:
        interval = self.config.algorithm.ref_update_interval
        if interval and (rollout_id + 1) % interval == 0:
            self.trainer.update_reference()

    def sync_weights(self, version: int) -> dict[str, float]:
        """Push the trainer's weights to the engines (a no-op without any: --debug-train-only)."""
        self.buffer.set_weight_version(version)
        return self.run_async(self._push(version)) if self.client is not None else {}

    def evaluate(self) -> dict[str, float]:
        """Mean reward and accuracy (fraction of samples with reward >= 1) per eval set (or --eval-function-path)."""
        return self.run_async(self.evaluate_async())

    async def evaluate_async(self) -> dict[str, float]:
        """``evaluate`` on the running event loop (the async loop's: its engine clients stay on one loop)."""
        if self.hooks.evaluate is not None:
            request = EvalRequest(self.num_rollouts_done, self.eval_sets, self.config.eval.n_samples_per_eval_prompt,
                                  self.sampling_params(evaluation=True), self.rollout, self.source)
            return await self.hooks.evaluate(request)
        out: dict[str, float] = {}
        num_tokens = 0
        for name, samples in self.eval_sets.items():
            with explain_oom(self.config, "eval"):
                groups = await self.rollout.generate_groups(
                    samples, self.config.eval.n_samples_per_eval_prompt, self.sampling_params(evaluation=True),
                    shape_rewards=False)
            raise_if_engine_ran_out(groups, self.config)
            rewards = [r for g in groups for r in self.rollout.rewards(g)]
            out[f"eval/{name}/reward_mean"] = statistics.fmean(rewards)
            out[f"eval/{name}/accuracy"] = sum(r >= 1.0 for r in rewards) / len(rewards)
            num_tokens += sum(s.response_length for g in groups for s in g.samples)
        out["eval/response_tokens"] = float(num_tokens)
        return out

    def rollout_metrics(self, groups: list[SampleGroup], rollout_id: int) -> dict[str, float]:
        """Rewards, accuracy, length distribution and staleness of the rollout ``rollout_id``."""
        metrics = rollout_metrics(groups, self.rollout)
        rewards = [self.rollout.rewards(g) for g in groups]
        metrics.update(response_metrics(groups, rewards, policy_version=rollout_id))
        if self.config.rollout.dynamic_sampling and self.last_sampling is not None:
            metrics.update(self.last_sampling.metrics())
        metrics.update(self.last_step_metrics)
        return metrics

    def sampling_params(self, evaluation: bool = False) -> SamplingParams:
        rollout, ev = self.config.rollout, self.config.eval
        params = SamplingParams(
            temperature=rollout.rollout_temperature, top_p=rollout.rollout_top_p, top_k=rollout.rollout_top_k,
            max_new_tokens=rollout.rollout_max_response_len, stop=list(rollout.rollout_stop),
            stop_token_ids=list(rollout.rollout_stop_token_ids),
        )
        if evaluation:
            params.temperature = ev.eval_temperature if ev.eval_temperature is not None else params.temperature
            params.top_p = ev.eval_top_p if ev.eval_top_p is not None else params.top_p
            params.max_new_tokens = ev.eval_max_response_len or params.max_new_tokens
        return params

    # ---- schedule, checkpoints, logging -----------------------------------------------------------
    def _due(self, interval: int | None, rollout_id: int) -> bool:
        """Every ``interval`` rollout steps, and after the last one."""
        done = rollout_id + 1
        return done == self.num_rollout or bool(interval and done % interval == 0)

    def eval_due(self, rollout_id: int) -> bool:
        return bool(self.eval_sets) and self._due(self.config.eval.eval_interval, rollout_id)

    def eval_before_train(self) -> bool:
        return bool(self.eval_sets) and not self.config.eval.skip_eval_before_train and self.start_rollout == 0

    def save_due(self, rollout_id: int) -> bool:
        ckpt = self.config.checkpoint
        return bool(ckpt.save or ckpt.save_hf) and self.trains and self._due(ckpt.save_interval, rollout_id)

    def save(self, rollout_id: int, step_metrics: dict | None = None, after_write=None) -> Path | None:
        """The checkpoint (--save) and HF export (--save-hf) after rollout ``rollout_id``; see RunCheckpoints."""
        return self.checkpoints.save(rollout_id, self.trainer, self.buffer, self.trackers.state_dict(), step_metrics,
                                     after_write)

    def _maybe_resume(self) -> dict | None:
        """Restore the run from --load; returns the checkpoint's run state, or None for a fresh start."""
        state = self.checkpoints.resume(self.trainer, self.buffer)
        if state is not None and self.trainer is not None:
            self.sync_weights(version=state.get("weight_version", state["rollout_id"] + 1))
        elif state is not None:  # --debug-rollout-only pushes nothing: the engine keeps the weights it started with
            self.buffer.set_weight_version(self.run_async(self.client.weight_version()) if self.client is not None else 0)
        return state

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of ``step`` completed rollout steps (0: the evaluation before training)."""
        self.trackers.log(metrics, step=step)
        if step == 0:
            self.log_line("before training: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())))
        else:
            self.progress.update(step - 1, metrics)

    def close(self) -> Path:
        """Stop the engine, close the trackers and draw the curves; returns the PNG path."""
        self.progress.close()
        self.trackers.close()
        if self.gateway is not None:
            self.gateway.stop()
        self._close_connections()
        self._stop_pools()
        self._close_loop()
        run_dir = Path(self.config.logging.run_dir)
        return plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")


    def _close_connections(self) -> None:
        """Close the connection pools of the engine client and a remote reward, on the loop that opened them."""
        for owner in (self.client, self.hooks.reward):
            closer = getattr(owner, "aclose", None)
            if closer is not None and not self._loop.is_closed():
                try:
                    self.run_async(closer())
                except Exception as error:  # noqa: BLE001 - the run is over; a failed close only leaks sockets
                    self.log_line(f"closing connections: {type(error).__name__}: {error}")

    def _close_loop(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()


def _number_groups(groups: list[SampleGroup]) -> None:
    """Each sample's group_index: its group's position in the step's batch."""
    for group_index, group in enumerate(groups):
        for sample in group.samples:
            sample.group_index = group_index


def held_groups(config: Config) -> int:
    """The buffer's memory bound, in groups. The sync loop holds one step's groups at a time (max_staleness more
    steps' worth leaves room to lag). The async loop generates ahead of the trainer: as many steps as the staleness
    bound allows, since groups generated further ahead would be too stale when their turn came."""
    batch = config.rollout.rollout_batch_size or 1
    bound = config.staleness_bound
    return batch * max(bound, 1) if config.sync.async_train else batch * (bound + 1)


def _counting(manager: RolloutManager, bar) -> RolloutManager:
    """``manager`` with a generate function that advances ``bar`` as each sample finishes."""
    inner = manager.generate_fn

    async def generate_and_count(sample, sampling_params, ctx):
        try:
            return await inner(sample, sampling_params, ctx)
        finally:
            bar.advance()

    return dataclasses.replace(manager, generate_fn=generate_and_count)


def _check_checkpoint_dir(flag: str, path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{flag} {path}: not a Hugging Face checkpoint directory (no config.json there)")
