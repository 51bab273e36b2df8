"""The example samples of a step (observability/samples.py), the accuracy threshold of rollout and eval metrics,
and the console's line above a progress bar."""

from __future__ import annotations

import io

import pytest

from sluice.observability.progress import ProgressReporter
from sluice.observability.samples import SampleLog, console_line, pick_samples, read_samples
from sluice.rollout.evaluation import reward_metrics
from sluice.rollout.metrics import rollout_metrics
from sluice.types import Sample, SampleGroup, Status


def groups_of(prompts: list, responses: list[str]) -> list[SampleGroup]:
    return [SampleGroup([Sample(prompt=p, response=r, label="7", status=Status.COMPLETED),
                         Sample(prompt=p, response=r + "!", label="7", status=Status.TRUNCATED)])
            for p, r in zip(prompts, responses)]


def test_pick_takes_the_first_sample_of_each_of_the_first_groups():
    groups = groups_of(["a", [{"role": "user", "content": "b?"}], "c"], ["x", "y", "z"])
    rewards = [[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]]
    picked = pick_samples(groups, rewards, step=3, source="rollout", count=2)
    assert [(s.prompt, s.response, s.reward, s.status) for s in picked] == [
        ("a", "x", 1.0, "completed"), ("user: b?", "y", 0.5, "completed")]
    assert all(s.step == 3 and s.source == "rollout" and s.label == "7" for s in picked)
    assert len(pick_samples(groups, rewards, 3, "rollout", count=10)) == 3


def test_console_line_keeps_the_prompts_end_and_the_responses_start_on_one_line():
    (sample,) = pick_samples(groups_of(["q" * 100 + "END?"], ["START\n" + "r" * 200]), [[0.25, 0.0]], 1, "eval/x", 1)
    line = console_line(sample)
    assert "\n" not in line
    assert line.startswith("  sample eval/x step 1: reward=0.25 prompt='...")
    assert "END?'" in line and "response='START\\nrrr" in line and "...' label='7'" in line
    assert len(line) < 260


def test_unscored_samples_show_no_reward(tmp_path):
    shown: list[str] = []
    log = SampleLog(tmp_path, count=1, show=shown.append)
    log.record(4, "sft", groups_of(["2+2="], ["4"]), None)
    log.close()
    assert shown == ["  sample sft step 4: prompt='2+2=' response='4' label='7'"]
    assert read_samples(tmp_path)[0]["reward"] is None


def test_sample_log_appends_and_a_resume_drops_the_steps_after_its_checkpoint(tmp_path):
    shown: list[str] = []
    log = SampleLog(tmp_path, count=1, show=shown.append)
    for step in (1, 2, 3):
        log.record(step, "rollout", groups_of([f"p{step}"], ["r"]), [[0.0, 0.0]])
    log.close()
    assert [r["step"] for r in read_samples(tmp_path)] == [1, 2, 3] and len(shown) == 3
    resumed = SampleLog(tmp_path, count=1, show=shown.append, resume_after_step=1)
    resumed.record(2, "rollout", groups_of(["again"], ["r"]), [[1.0, 0.0]])
    resumed.close()
    assert [(r["step"], r["prompt"]) for r in read_samples(tmp_path)] == [(1, "p1"), (2, "again")]


def test_accuracy_counts_rewards_at_or_above_the_threshold():
    rewards = [0.2, 0.5, 1.0]
    assert reward_metrics("x", rewards)["eval/x/accuracy"] == pytest.approx(1 / 3)
    assert reward_metrics("x", rewards, accuracy_threshold=0.5)["eval/x/accuracy"] == pytest.approx(2 / 3)
    groups = groups_of(["a", "b"], ["x", "y"])[:1] + [SampleGroup([Sample(prompt="b")])]
    metrics = rollout_metrics(groups, [[0.2, 0.5], [1.0]], accuracy_threshold=0.5)
    assert metrics["rollout/accuracy"] == pytest.approx(2 / 3)


def test_progress_write_prints_a_line_without_a_bar():
    stream = io.StringIO()  # not a terminal: no bar, plain lines
    reporter = ProgressReporter(2, stream=stream)
    reporter.write("  sample rollout step 1: reward=0")
    reporter.update(0, {"rollout/reward_mean": 0.0})
    assert stream.getvalue().splitlines()[0] == "  sample rollout step 1: reward=0"
    assert stream.getvalue().splitlines()[1].startswith("step 1/2")
