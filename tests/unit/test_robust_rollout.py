"""Robust reward execution with the real engine: per-call timeouts, cancellation of pending work when the batch is
full (a reward that never returns does not stall the step), failures confined to their samples and logged with
the sample id, the failure budget, and group rewards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time

import pytest

from sluice.data import PromptSource
from sluice.engine.clients.in_process import InProcessClient
from sluice.rewards.custom import as_async_reward
from sluice.rollout.dynamic_sampling import sample_filtered_groups
from sluice.rollout.failures import RolloutFailed, check_failure_budget
from sluice.rollout.generate import GenerateContext
from sluice.rollout.manager import RolloutManager
from sluice.types import Sample, SampleGroup, SamplingParams, Status

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def ctx(engine) -> GenerateContext:
    return GenerateContext(InProcessClient(engine), engine.tokenizer)


def prompts(tokenizer, names: list[str]) -> list[Sample]:
    return [Sample(prompt=n, prompt_tokens=tokenizer.encode(n, add_special_tokens=False)) for n in names]


async def stuck_or_one(sample: Sample) -> float:
    """Never returns for 'stuck' prompts (as a hung judge would), 1.0 for the rest."""
    if sample.prompt.startswith("stuck"):
        await asyncio.Event().wait()
    return 1.0


def wait_until_idle(engine, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        load = engine.load()
        if load["num_running"] == 0 and load["num_waiting"] == 0:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.load()}")


def test_a_reward_that_never_returns_does_not_stall_a_full_batch(ctx, engine):
    names = ["stuck a", "ok b", "stuck c", "ok d", "ok e"]
    source = PromptSource(prompts(ctx.tokenizer, names), shuffle=False, seed=0)
    manager = RolloutManager(ctx, stuck_or_one, reward_timeout_s=600.0)  # the timeout is never what ends it
    start = time.monotonic()
    outcome = asyncio.run(sample_filtered_groups(manager, source, target=2, over_sampling_batch_size=5, n_samples=2,
                                                 sampling_params=SamplingParams(max_new_tokens=4), group_filter=None))
    assert time.monotonic() - start < 10.0
    assert {g.prompt for g in outcome.groups} <= {"ok b", "ok d", "ok e"} and len(outcome.groups) == 2
    assert outcome.num_cancelled_groups >= 2  # both stuck groups were cancelled, not awaited
    assert all(s.reward == 1.0 for g in outcome.groups for s in g.samples)
    wait_until_idle(engine)


def test_a_blocking_sync_reward_is_abandoned_without_holding_up_the_event_loop(ctx):
    release = threading.Event()
    released: list[str] = []  # stuck scorers that got past their lock

    def blocking(sample: Sample) -> float:  # a sync scorer stuck on a lock, say
        if sample.prompt.startswith("stuck"):
            release.wait(60)
            released.append(sample.prompt)
        return 1.0

    manager = RolloutManager(ctx, as_async_reward(blocking), reward_timeout_s=0.3)
    groups = asyncio.run(manager.generate_groups(prompts(ctx.tokenizer, ["stuck a", "ok b"]), 2,
                                                 SamplingParams(max_new_tokens=3)))
    stuck_when_returned = not released  # asyncio.run returned: no executor waited for the stuck threads
    release.set()
    assert stuck_when_returned
    stuck, fine = groups
    assert all(s.status == Status.FAILED and "timed out" in s.metadata["reward_error"] for s in stuck.samples)
    assert all(s.status != Status.FAILED and s.reward == 1.0 for s in fine.samples)


def test_closing_a_stream_cancels_generation_and_aborts_engine_requests(ctx, engine):
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)

    async def first_group_only() -> tuple[SampleGroup, float]:
        manager = RolloutManager(ctx, stuck_or_one)
        stream = manager.stream_groups(prompts(ctx.tokenizer, ["ok", "stuck x", "stuck y"]), 2, long)
        async with contextlib.aclosing(stream) as groups:
            async for group in groups:
                closed_at = time.monotonic()
                return group, closed_at

    group, closed_at = asyncio.run(first_group_only())
    assert group.prompt == "ok" and [s.response_length for s in group.samples] == [200, 200]
    assert time.monotonic() - closed_at < 2.0
    wait_until_idle(engine, timeout_s=2.0)  # the stuck groups' rewards were cancelled; nothing left in the engine


def test_reward_errors_fail_their_samples_and_are_logged_with_the_sample_id(ctx, caplog):
    async def judge(sample: Sample) -> float:
        if sample.index == 3:
            raise ConnectionError("judge down")
        return 1.0

    manager = RolloutManager(ctx, judge)
    with caplog.at_level(logging.WARNING, logger="sluice.rollout"):
        groups = asyncio.run(manager.generate_groups(prompts(ctx.tokenizer, ["a", "b"]), 2,
                                                     SamplingParams(max_new_tokens=3)))
    failed = [s for g in groups for s in g.samples if s.status == Status.FAILED]
    assert [s.index for s in failed] == [3] and failed[0].metadata["reward_error"] == "ConnectionError: judge down"
    name = f"{__name__}.test_reward_errors_fail_their_samples_and_are_logged_with_the_sample_id.<locals>.judge"
    assert f"reward fn {name} raised ConnectionError on sample 3 (group 1)" in caplog.text


def test_a_failing_reward_shows_its_first_traceback_then_counts_per_step(ctx, caplog):
    def picky(sample: Sample) -> float:  # sync: it runs in a worker thread, as most user scorers do
        if sample.prompt == "b":
            raise ValueError(f"cannot score {sample.index}")
        if sample.prompt == "c":
            return {}["missing"]
        return 1.0

    manager = RolloutManager(ctx, as_async_reward(picky, "scorers.picky"))
    with caplog.at_level(logging.WARNING, logger="sluice.rollout"):
        asyncio.run(manager.generate_groups(prompts(ctx.tokenizer, ["a", "b", "c"]), 3,
                                            SamplingParams(max_new_tokens=2)))
        lines = manager.failures.flush("this step")
    text = caplog.text
    assert text.count("Traceback (most recent call last)") == 2  # one per error type, not one per sample
    assert text.count("reward fn scorers.picky raised ValueError on sample") == 1
    assert 'raise ValueError(f"cannot score {sample.index}")' in text  # the user's frame, in full
    assert "scoring.py" not in text and "plugins.py" not in text  # not the rollout's own frames
    assert sorted(line.split(" (first")[0] for line in lines) == [
        "reward fn scorers.picky raised KeyError 3 times this step",
        "reward fn scorers.picky raised ValueError 3 times this step"]
    assert all(re.search(r"\(first: sample [345], group 1\)$", line) for line in lines if "ValueError" in line)
    assert all(re.search(r"\(first: sample [678], group 2\)$", line) for line in lines if "KeyError" in line)
    assert manager.failures.flush() == []  # counted once


def test_buffer_groups_keep_their_own_group_number(ctx, caplog):
    async def judge(sample: Sample) -> float:
        raise RuntimeError("down")

    manager = RolloutManager(ctx, judge)
    group = SampleGroup([s for s in prompts(ctx.tokenizer, ["x", "x"])], group_id=5)
    with caplog.at_level(logging.WARNING, logger="sluice.rollout"):
        asyncio.run(manager.continue_group(group, SamplingParams(max_new_tokens=2)))
    assert [(s.index, s.group_index) for s in group.samples] == [(10, 5), (11, 5)]
    assert re.search(r"raised RuntimeError on sample 1[01] \(group 5\)", caplog.text)


def test_the_failure_budget_stops_the_run_only_past_the_ratio():
    def groups_with(num_failed: int, total: int = 8) -> list[SampleGroup]:
        samples = [Sample(prompt="p", index=i, status=Status.FAILED if i < num_failed else Status.COMPLETED,
                          metadata={"reward_error": f"boom {i}"} if i < num_failed else {}) for i in range(total)]
        return [SampleGroup(samples[:4]), SampleGroup(samples[4:])]

    check_failure_budget(groups_with(4), 0.5)  # exactly half: still trained on
    with pytest.raises(RolloutFailed) as error:
        check_failure_budget(groups_with(5), 0.5)
    message = str(error.value)
    assert "5 of 8 samples" in message and "--max-failed-sample-ratio 0.5" in message
    assert "sample 0: boom 0" in message and "sample 3" not in message  # the first errors only
    check_failure_budget(groups_with(8), 1.0)  # 1.0: never stop
    with pytest.raises(RolloutFailed):
        check_failure_budget(groups_with(1), 0.0)


def test_group_rewards_see_whole_groups_and_a_failure_fails_the_group(ctx):
    calls = []

    async def rank(samples: list[Sample]) -> list[float]:
        calls.append(len(samples))
        if samples[0].prompt == "bad":
            raise ValueError("cannot rank")
        return [float(i) for i in range(len(samples))]

    manager = RolloutManager(ctx, None, group_reward_fn=rank)
    groups = asyncio.run(manager.generate_groups(prompts(ctx.tokenizer, ["good", "bad"]), 3,
                                                 SamplingParams(max_new_tokens=3)))
    assert sorted(calls) == [3, 3]
    assert [s.reward for s in groups[0].samples] == [0.0, 1.0, 2.0]
    assert all(s.status == Status.FAILED and "cannot rank" in s.metadata["reward_error"] for s in groups[1].samples)
