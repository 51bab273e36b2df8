"""Finishing a rollout batch: the one step between "groups came out of generation" and "the trainer takes them".

Both loops call ``BatchFinisher.finish`` on a step's groups (the sync loop after generating or replaying them,
the async loop after taking them from the buffer). In order, it:

1. logs one line per (function, error type) that failed samples since the last step (the first traceback of
   each was logged as it happened; rollout/plugin_failures.py), then numbers the groups: each sample's
   ``group_index`` becomes its group's position in the batch;
2. stops the run when an engine ran out of memory (a failed sample whose error is an OOM; ``MemoryGuard``), or
   when more than --max-failed-sample-ratio of the samples failed (rollout/failures.py). A replayed batch
   (--load-debug-rollout-data) was checked when it was generated, and is not checked again;
3. saves the batch for --save-debug-rollout-data;
4. pulls each sample's scalar reward once (--reward-key picks from a dict reward);
5. computes the batch's metrics once (rollout/metrics.py), plus what the step's generation reported;
6. hands the batch to the sample log, which keeps a few examples (--num-logged-samples).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from sluice.checkpoint.rollout_data import rollout_data_path, save_rollout_data
from sluice.config import ConfigError
from sluice.rollout.failures import check_failure_budget
from sluice.rollout.manager import RolloutManager
from sluice.rollout.metrics import rollout_metrics
from sluice.types import SampleGroup, Status


class MemoryGuard(Protocol):
    """Out-of-memory errors turned into advice naming the flags to lower (orchestration/oom.py)."""

    def explain(self, stage: str) -> AbstractContextManager[None]:
        """A block whose out-of-memory error is re-raised with the advice for ``stage``."""

    def check_engines(self, groups: list[SampleGroup]) -> None:
        """Raise with the advice when a sample failed because its engine ran out of memory."""


class SampleSink(Protocol):
    """Where example samples go (observability/samples.py: samples.jsonl and the console)."""

    def record(self, step: int, source: str, groups: list[SampleGroup], rewards: list[list[float]] | None) -> None:
        """Keep a few of ``groups``' samples of ``step`` (rollout steps completed); ``source``: "rollout", "sft" or
        "eval/<set>"; ``rewards``: their scalar rewards, group by group (None: not scored)."""


@dataclass
class FinishedBatch:
    """A step's batch, ready to train on."""

    groups: list[SampleGroup]  # in training order; sample.group_index is the group's position
    rewards: list[list[float]]  # the scalar reward of each sample, group by group (0.0 where none was set)
    metrics: dict[str, float]  # rollout/... metrics of the batch, logged with the step

    @property
    def num_tokens(self) -> float:
        """Tokens (prompt and response) of the samples that train: failed samples are dropped."""
        return float(sum(len(s.tokens) for g in self.groups for s in g.samples if s.status != Status.FAILED))


def scalar_rewards(groups: list[SampleGroup], manager: RolloutManager) -> list[list[float]]:
    """Each sample's reward as one float, group by group."""
    try:
        return [manager.rewards(g) for g in groups]
    except (ValueError, KeyError) as error:  # dict rewards without (or with a wrong) --reward-key
        raise ConfigError(f"--reward-key: {error}") from error


def number_groups(groups: list[SampleGroup]) -> None:
    """Each sample's group_index: its group's position in the step's batch."""
    for group_index, group in enumerate(groups):
        for sample in group.samples:
            sample.group_index = group_index


@dataclass
class BatchFinisher:
    manager: RolloutManager  # its reward key and overlong shaping
    memory: MemoryGuard
    max_failed_sample_ratio: float  # --max-failed-sample-ratio
    save_rollout_data: str | None = None  # --save-debug-rollout-data: a path template with {rollout_id}
    accuracy_threshold: float = 1.0  # --eval-accuracy-threshold
    samples: SampleSink | None = None  # example samples of each step
    scored: bool = True  # False for SFT from data: the samples carry no reward worth showing

    def finish(self, groups: list[SampleGroup], rollout_id: int, *, generated: bool = True,
               step_metrics: dict[str, float] | None = None) -> FinishedBatch:
        """The batch of step ``rollout_id``. ``generated``: False for a replayed batch (not checked again).
        ``step_metrics``: what the step's generation reported (dynamic sampling counts, a rollout function's)."""
        self.manager.failures.flush("this step")
        number_groups(groups)
        if generated:
            self.memory.check_engines(groups)
            check_failure_budget(groups, self.max_failed_sample_ratio)
        if self.save_rollout_data:
            save_rollout_data(rollout_data_path(self.save_rollout_data, rollout_id), rollout_id, groups)
        rewards = scalar_rewards(groups, self.manager)
        metrics = rollout_metrics(groups, rewards, policy_version=rollout_id,
                                  overlong_shaped=self.manager.overlong is not None,
                                  accuracy_threshold=self.accuracy_threshold)
        metrics.update(step_metrics or {})
        if self.samples is not None:
            if self.scored:
                self.samples.record(rollout_id + 1, "rollout", groups, rewards)
            else:
                self.samples.record(rollout_id + 1, "sft", groups, None)
        return FinishedBatch(groups, rewards, metrics)
