"""A run on one machine, in one process: engine, rollout manager, trainer, data, metrics.

``LocalRun`` owns the parts and gives the loop one verb per stage; the loop itself lives in loops.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from sluice.checkpoint.store import (
    capture_rng_state,
    find_latest,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from sluice.config import Config, ConfigError, config_to_dict
from sluice.data import PromptSource, load_prompt_samples
from sluice.engine.client import InProcessClient
from sluice.engine.local_engine import LocalEngine
from sluice.observability.metrics import MetricsWriter
from sluice.observability.plots import plot_curves
from sluice.observability.progress import ProgressReporter
from sluice.rewards import get_reward_fn
from sluice.rewards.overlong import OverlongShaping
from sluice.rollout.dynamic_sampling import SamplingOutcome, load_group_filter, sample_filtered_groups
from sluice.rollout.generate import GenerateContext
from sluice.rollout.manager import RolloutManager, rollout_metrics
from sluice.sync.in_process import push_weights
from sluice.trainer.custom_loss import load_custom_loss
from sluice.trainer.torch_backend import TorchTrainer
from sluice.trainer.update import update_policy
from sluice.types import SampleGroup, SamplingParams, Status


class LocalRun:
    def __init__(self, config: Config, log=print):
        hf_logging.disable_progress_bar()
        self.config, self.log_line = config, log
        checkpoint = config.model.hf_checkpoint
        _check_checkpoint_dir("--hf-checkpoint", checkpoint)
        if config.model.ref_load:
            _check_checkpoint_dir("--ref-load", config.model.ref_load)
        reward_fn = _load_reward(config)
        self.custom_loss = _load_custom_loss(config)
        self.group_filter = _load_group_filter(config)
        self.last_sampling: SamplingOutcome | None = None  # counts of the latest dynamic-sampling rollout
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        samples, report = load_prompt_samples(config.data.prompt_data, config.data, self.tokenizer)
        self._report_load(config.data.prompt_data, report)
        self.source = PromptSource(samples, config.data.rollout_shuffle, config.data.rollout_seed)
        self.eval_sets = {}
        for name, path in config.eval_sets:
            eval_samples, eval_report = load_prompt_samples(path, config.data, self.tokenizer)
            self._report_load(path, eval_report)
            self.eval_sets[name] = eval_samples
        self.engine = LocalEngine(checkpoint, config.engine)
        try:
            self._start(config, checkpoint, reward_fn)
        except BaseException:
            self.engine.shutdown()  # its worker thread would otherwise outlive a failed start
            raise

    def _start(self, config: Config, checkpoint: str, reward_fn) -> None:
        self.client = InProcessClient(self.engine)
        self.rollout = RolloutManager(
            GenerateContext(self.client, self.tokenizer),
            reward_fn,
            max_concurrency=config.rollout.rollout_max_concurrency,
            reward_key=config.reward.reward_key,
            overlong=_overlong_shaping(config),
        )
        self.trainer = TorchTrainer(checkpoint, config.train, config.algorithm, config.rollout.rollout_temperature,
                                    config.model.ref_load, custom_loss=self.custom_loss)
        self.num_rollout = config.rollout.num_rollout or self.source.num_rollouts_for_epochs(
            config.rollout.num_epoch, config.rollout.rollout_batch_size)
        self.start_rollout = self._maybe_resume()
        self.num_rollouts_done = self.start_rollout
        self.metrics = MetricsWriter(config.logging.run_dir,
                                     resume_after_step=self.start_rollout if config.checkpoint.load else None)
        self.progress = ProgressReporter(self.num_rollout, enabled=config.logging.progress_bar)

    def _report_load(self, path: str, report) -> None:
        if report.num_dropped_too_long:
            self.log_line(f"{path}: dropped {report.num_dropped_too_long} of {report.num_rows} prompts longer "
                          f"than --rollout-max-prompt-len {self.config.data.rollout_max_prompt_len}")

    # ---- stages -------------------------------------------------------------------------------------
    def generate(self) -> list[SampleGroup]:
        rollout = self.config.rollout
        first_index = self.num_rollouts_done * self.config.samples_per_rollout  # Sample.index: unique in the run
        self.num_rollouts_done += 1
        if rollout.dynamic_sampling:
            self.last_sampling = asyncio.run(sample_filtered_groups(
                self.rollout, self.source, rollout.rollout_batch_size,
                rollout.over_sampling_batch_size or rollout.rollout_batch_size, rollout.n_samples_per_prompt,
                self.sampling_params(), self.group_filter, first_index=first_index))
            groups = self.last_sampling.groups
            self._report_short_batch(self.last_sampling)
        else:
            prompts = self.source.next_batch(rollout.rollout_batch_size)
            groups = asyncio.run(self.rollout.generate_groups(prompts, rollout.n_samples_per_prompt,
                                                              self.sampling_params(), first_index=first_index))
        _raise_if_all_failed(groups)
        return groups

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
        algorithm = self.config.algorithm
        return update_policy(self.trainer, groups, algorithm, rewards, self.config.global_batch_size,
                             self.tokenizer.pad_token_id or 0, self.config.rollout.rollout_max_response_len,
                             train_actor=rollout_id >= algorithm.num_critic_only_steps)

    def maybe_update_reference(self, rollout_id: int) -> None:
        interval = self.config.algorithm.ref_update_interval
        if interval and (rollout_id + 1) % interval == 0:
            self.trainer.update_reference()

    def sync_weights(self, version: int) -> None:
        asyncio.run(push_weights(self.trainer.named_weights(), [self.client], version))

    def evaluate(self) -> dict[str, float]:
        """Mean reward and accuracy (fraction of samples with reward >= 1) per eval set."""
        out: dict[str, float] = {}
        for name, samples in self.eval_sets.items():
            groups = asyncio.run(self.rollout.generate_groups(
                samples, self.config.eval.n_samples_per_eval_prompt, self.sampling_params(evaluation=True),
                shape_rewards=False))
            rewards = [r for g in groups for r in self.rollout.rewards(g)]
            out[f"eval/{name}/reward_mean"] = statistics.fmean(rewards)
            out[f"eval/{name}/accuracy"] = sum(r >= 1.0 for r in rewards) / len(rewards)
        return out

    def rollout_metrics(self, groups: list[SampleGroup]) -> dict[str, float]:
        metrics = rollout_metrics(groups, self.rollout)
        if self.config.rollout.dynamic_sampling and self.last_sampling is not None:
            metrics.update(self.last_sampling.metrics())
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
        return bool(ckpt.save) and self._due(ckpt.save_interval, rollout_id)

    def save(self, rollout_id: int) -> Path:
        return save_checkpoint(self.config.checkpoint.save, rollout_id, self.trainer,
                               {"source": self.source.state_dict(), "rng": capture_rng_state()})

    def _maybe_resume(self) -> int:
        load = self.config.checkpoint.load
        if not load:
            return 0
        try:
            path = find_latest(load) or (Path(load) if (Path(load) / "trainer.pt").exists() else None)
        except FileNotFoundError as error:
            raise ConfigError(f"--load {load}: {error}") from error
        if path is None:
            raise ConfigError(f"--load {load}: no checkpoint there (expected {load}/latest or {load}/trainer.pt)")
        try:
            state = load_checkpoint(path, self.trainer)
        except ValueError as error:  # e.g. a ppo run resuming from a checkpoint without a critic
            raise ConfigError(f"--load {load}: {error}") from error
        try:
            self.source.load_state_dict(state["source"])
        except ValueError as error:  # the prompt file, shuffle or seed changed since the save
            raise ConfigError(f"--load {load}: {error}") from error
        self.sync_weights(version=state["rollout_id"] + 1)
        if "rng" in state:  # the sampling stream continues where the saved run was, not from --seed again
            restore_rng_state(state["rng"])
        self.log_line(f"resumed from {path} at rollout {state['rollout_id'] + 1}")
        return state["rollout_id"] + 1

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of ``step`` completed rollout steps (0: the evaluation before training)."""
        self.metrics.log(metrics, step=step)
        if step == 0:
            self.log_line("before training: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())))
        else:
            self.progress.update(step - 1, metrics)

    def close(self) -> Path:
        """Stop the engine, close the metrics file and draw the curves; returns the PNG path."""
        self.progress.close()
        self.metrics.close()
        self.engine.shutdown()
        run_dir = Path(self.config.logging.run_dir)
        return plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")


def _check_checkpoint_dir(flag: str, path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{flag} {path}: not a Hugging Face checkpoint directory (no config.json there)")


def _load_reward(config: Config):
    """Resolve the reward before anything heavy loads, so a typo fails in a second, naming its flag."""
    slime_args = argparse.Namespace(**config_to_dict(config))  # for slime-style (args, sample) functions
    try:
        return get_reward_fn(config.reward.rm_type, config.reward.custom_rm_path, slime_args=slime_args)
    except (ValueError, ImportError, TypeError) as error:
        flag = "--custom-rm-path" if config.reward.custom_rm_path else "--rm-type"
        raise ConfigError(f"{flag}: {error}") from error


def _load_custom_loss(config: Config):
    """Load --custom-loss-function-path before anything heavy, so a bad path or signature fails in a second."""
    path = config.algorithm.custom_loss_function_path
    if config.algorithm.loss_type != "custom_loss" or path is None:
        return None
    try:
        return load_custom_loss(path)
    except (ValueError, ImportError, TypeError) as error:
        raise ConfigError(str(error)) from error


def _load_group_filter(config: Config):
    path = config.rollout.dynamic_sampling_filter_path
    if path is None:
        return None
    slime_args = argparse.Namespace(**config_to_dict(config))  # for slime-style (args, samples) filters
    try:
        return load_group_filter(path, slime_args)
    except (ValueError, ImportError, TypeError) as error:
        raise ConfigError(f"--dynamic-sampling-filter-path: {error}") from error


def _overlong_shaping(config: Config) -> OverlongShaping | None:
    reward = config.reward
    if reward.overlong_buffer_len is None:
        return None
    return OverlongShaping(config.rollout.rollout_max_response_len, reward.overlong_buffer_len,
                           reward.overlong_penalty_factor)


class RolloutFailed(RuntimeError):
    """Every sample of a rollout failed: training on nothing would hide the cause."""


def _raise_if_all_failed(groups: list[SampleGroup]) -> None:
    samples = [s for g in groups for s in g.samples]
    if samples and all(s.status == Status.FAILED for s in samples):
        errors = samples[0].metadata.get("reward_error") or samples[0].metadata.get("generate_error")
        raise RolloutFailed(f"all {len(samples)} samples of the rollout failed; the first error: {errors}")
