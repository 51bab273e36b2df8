"""The learning-signal diagnostics: the share of groups without reward spread, and the warnings of a step that
teaches the policy nothing (their cadence and their conditions)."""

from __future__ import annotations

import pytest

from sluice.observability.signal import REPEAT_EVERY, RepeatingWarning, SignalWatch
from sluice.rollout.metrics import rollout_metrics, zero_std_group_fraction
from sluice.types import Status
from helpers.stub_trainer import groups_of


def test_zero_std_group_fraction_counts_groups_whose_kept_rewards_are_equal():
    rewards = [[1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0]]
    groups = groups_of(rewards)
    assert zero_std_group_fraction(groups, rewards) == pytest.approx(2 / 4)  # the equal group and the single
    groups[2].samples[0].status = Status.FAILED  # its reward is not trained on: the rest, 0 and 0, are equal
    assert zero_std_group_fraction(groups, rewards) == pytest.approx(3 / 4)
    assert rollout_metrics(groups, rewards)["rollout/zero_std_group_fraction"] == pytest.approx(3 / 4)


def test_zero_std_group_fraction_refuses_rewards_that_do_not_match_the_groups():
    with pytest.raises(ValueError):
        zero_std_group_fraction(groups_of([[1.0, 0.0]]), [[1.0]])


def test_a_lasting_condition_warns_first_then_every_n_steps_and_a_break_restarts_the_count():
    warning = RepeatingWarning(every=3)
    due = [warning.due(holds) for holds in [True] * 7 + [False] + [True] * 2]
    assert due == [True, False, False, True, False, False, True, False, True, False]


NO_SIGNAL = {"rollout/zero_std_group_fraction": 1.0, "train/advantage_abs_mean": 0.0, "train/grad_norm": 0.0,
             "rollout/reward_mean": 0.0}


def test_no_signal_warns_once_then_every_repeat_steps_in_the_runs_log():
    lines: list[str] = []
    watch = SignalWatch(lines.append)
    warned = [step for step in range(1, 2 * REPEAT_EVERY + 2) if watch.check(step, NO_SIGNAL)]
    assert warned == [1, REPEAT_EVERY + 1, 2 * REPEAT_EVERY + 1]
    assert len(lines) == 3
    assert lines[0].startswith("warning: no learning signal at step 1: every group's rewards are equal (reward mean "
                               "0), so every advantage is 0")
    assert f"repeated every {REPEAT_EVERY} steps" in lines[0]


@pytest.mark.parametrize("metrics", [
    {**NO_SIGNAL, "rollout/zero_std_group_fraction": 0.9},  # one group in ten has a spread
    {**NO_SIGNAL, "train/advantage_abs_mean": 0.3, "train/grad_norm": 0.2},  # KL-shaped or critic advantages
    {"rollout/zero_std_group_fraction": 1.0, "rollout/reward_mean": 0.0},  # nothing trained (rollout only, SFT)
])
def test_steps_with_a_signal_or_without_training_do_not_warn(metrics):
    lines: list[str] = []
    assert SignalWatch(lines.append).check(1, metrics) == [] and lines == []


def test_a_zero_gradient_with_nonzero_advantages_warns():
    lines: list[str] = []
    watch = SignalWatch(lines.append)
    (message,) = watch.check(4, {"rollout/zero_std_group_fraction": 0.5, "train/advantage_abs_mean": 0.25,
                                 "train/grad_norm": 0.0})
    assert message.startswith("gradient norm 0 at step 4 although the advantages are not (mean |advantage| 0.25")
    assert watch.check(5, {"rollout/zero_std_group_fraction": 0.5, "train/advantage_abs_mean": 0.25,
                           "train/grad_norm": 0.1}) == []
    assert lines == ["warning: " + message]
