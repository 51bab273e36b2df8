"""RolloutManager with the real in-process engine: group shapes, sample fields, rewards and failures."""

from __future__ import annotations

import asyncio

import pytest
import torch

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.engine.clients.in_process import InProcessClient
from sluice.rollout.generate import GenerateContext, generate_single_turn
from sluice.rollout.finish import scalar_rewards
from sluice.rollout.manager import RolloutManager
from sluice.rollout.metrics import rollout_metrics
from sluice.trainer.batching import collate
from sluice.trainer.torch_backend import TorchTrainer
from sluice.trainer.update import update_policy
from sluice.types import Sample, SamplingParams, Status

# The engine passes `past_key_values`, which newer transformers rename; the engine silences the notice at import,
# but pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

EOS = 2
MAX_NEW = 6
PROMPTS = [("hi", "a"), ("what is 2+2?", "4"), ("reverse 12345 please", "54321")]


@pytest.fixture(scope="module")
def ctx(engine) -> GenerateContext:
    return GenerateContext(InProcessClient(engine), engine.tokenizer)


def prompt_samples(tokenizer) -> list[Sample]:
    return [Sample(prompt=text, prompt_tokens=tokenizer.encode(text, add_special_tokens=False), label=label,
                   metadata={"source": text}) for text, label in PROMPTS]


async def length_reward(sample: Sample) -> float:
    await asyncio.sleep(0)  # a real coroutine that yields, as a remote judge would
    return float(len(sample.response)) + (0.5 if sample.label == "4" else 0.0)


def params(**kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, **kw)


def test_generate_groups_fills_every_sample_field(ctx, engine, lively_checkpoint):
    manager = RolloutManager(ctx, length_reward, max_concurrency=5)
    prompts = prompt_samples(ctx.tokenizer)
    groups = asyncio.run(manager.generate_groups(prompts, 4, params(), first_index=100))

    assert [len(g.samples) for g in groups] == [4, 4, 4]
    samples = [s for g in groups for s in g.samples]
    assert sorted(s.index for s in samples) == list(range(100, 112))
    for group_index, (group, prompt) in enumerate(zip(groups, prompts)):
        assert group.prompt == prompt.prompt
        for sample in group.samples:
            assert sample.group_index == group_index
            assert sample.label == prompt.label and sample.metadata["source"] == prompt.prompt
            assert sample.prompt_tokens == prompt.prompt_tokens
            assert sample.tokens[: len(sample.prompt_tokens)] == sample.prompt_tokens
            response = sample.response_tokens
            assert 1 <= sample.response_length == len(response) <= MAX_NEW
            assert sample.loss_mask == [1] * sample.response_length
            assert len(sample.rollout_log_probs) == sample.response_length
            assert all(lp <= 0.0 for lp in sample.rollout_log_probs)
            assert sample.weight_versions == [engine.weight_version]
            assert sample.response == ctx.tokenizer.decode(response, skip_special_tokens=True)
            if response[-1] == EOS:
                assert sample.status == Status.COMPLETED
            else:
                assert sample.status == Status.TRUNCATED and sample.response_length == MAX_NEW
            assert sample.reward == float(len(sample.response)) + (0.5 if sample.label == "4" else 0.0)
    # the prompt samples handed in are copied, never filled in
    assert all(p.tokens == [] and p.reward is None for p in prompts)
    # the samples of a group differ (independent draws)
    assert all(len({tuple(s.tokens) for s in g.samples}) > 1 for g in groups)

    metrics = rollout_metrics(groups, scalar_rewards(groups, manager))
    rewards = [s.reward for s in samples]
    assert metrics["rollout/reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    assert metrics["rollout/num_samples"] == 12.0
    assert metrics["rollout/response_len_mean"] == pytest.approx(sum(s.response_length for s in samples) / 12)
    assert metrics["rollout/failed_frac"] == 0.0

    # The engine's logprobs are the trainer's logprobs of the same tokens (same temperature).
    trainer = TorchTrainer(lively_checkpoint, TrainConfig(train_device="cpu", micro_batch_size=12, use_dynamic_batch_size=False),
                           AlgorithmConfig(), temperature=1.0)
    batch = collate(samples, [0.0] * len(samples), pad_id=0)
    trained = batch.loss_mask.bool()
    torch.testing.assert_close(trainer.compute_logprobs(batch)[trained], batch.rollout_log_probs[trained],
                               atol=1e-4, rtol=0)


def test_a_reward_function_that_raises_fails_only_its_samples(ctx, lively_checkpoint):
    async def picky_reward(sample: Sample) -> float:
        if sample.label == "4":
            raise RuntimeError("judge unavailable")
        return 1.0 if sample.response_length % 2 else 0.0

    manager = RolloutManager(ctx, picky_reward)
    groups = asyncio.run(manager.generate_groups(prompt_samples(ctx.tokenizer), 3, params()))
    failed, fine = groups[1].samples, groups[0].samples + groups[2].samples
    assert all(s.status == Status.FAILED for s in failed)
    assert all(s.reward == 0.0 and "judge unavailable" in s.metadata["reward_error"] for s in failed)
    assert all(s.status in (Status.COMPLETED, Status.TRUNCATED) for s in fine)
    assert all(s.reward == (1.0 if s.response_length % 2 else 0.0) for s in fine)
    assert all(s.response_length >= 1 for s in failed)  # generation itself succeeded
    assert rollout_metrics(groups, scalar_rewards(groups, manager))["rollout/failed_frac"] == pytest.approx(3 / 9)

    # failed samples are dropped from training
    trainer = TorchTrainer(lively_checkpoint, TrainConfig(train_device="cpu", micro_batch_size=8, use_dynamic_batch_size=False, lr=1e-4),
                           AlgorithmConfig(), temperature=1.0)
    rewards = [manager.rewards(g) for g in groups]
    assert rewards[1] == [0.0, 0.0, 0.0]
    metrics = update_policy(trainer, groups, AlgorithmConfig(), rewards, global_batch_size=9, pad_id=0)
    assert metrics["train/num_samples"] == 6.0


def test_a_generate_function_that_raises_fails_its_sample_without_killing_others(ctx):
    async def flaky_generate(sample: Sample, sampling_params: SamplingParams, gctx: GenerateContext) -> Sample:
        if sample.index in (1, 7):
            raise ValueError(f"tool crashed on {sample.index}")
        return await generate_single_turn(sample, sampling_params, gctx)

    calls = []

    async def counting_reward(sample: Sample) -> float:
        calls.append(sample.index)
        return 1.0

    manager = RolloutManager(ctx, counting_reward, generate_fn=flaky_generate)
    groups = asyncio.run(manager.generate_groups(prompt_samples(ctx.tokenizer), 3, params()))
    assert [len(g.samples) for g in groups] == [3, 3, 3]
    by_index = {s.index: s for g in groups for s in g.samples}
    for index, sample in by_index.items():
        if index in (1, 7):
            assert sample.status == Status.FAILED
            assert sample.metadata["generate_error"] == f"ValueError: tool crashed on {index}"
            assert sample.reward is None and sample.tokens == []
        else:
            assert sample.status in (Status.COMPLETED, Status.TRUNCATED)
            assert sample.reward == 1.0 and sample.response_length >= 1
    assert sorted(calls) == [i for i in range(9) if i not in (1, 7)]  # failed samples are not scored
    assert manager.rewards(groups[0]) == [1.0, 0.0, 1.0]


def test_a_generate_function_may_return_several_samples(ctx):
    async def two_turns(sample: Sample, sampling_params: SamplingParams, gctx: GenerateContext) -> list[Sample]:
        first = await generate_single_turn(sample, sampling_params, gctx)
        second = Sample(prompt=sample.prompt, group_index=sample.group_index, index=sample.index + 1000,
                        prompt_tokens=list(sample.prompt_tokens), label=sample.label)
        return [first, await generate_single_turn(second, sampling_params, gctx)]

    async def one(sample: Sample) -> float:
        return 1.0

    manager = RolloutManager(ctx, one, generate_fn=two_turns)
    groups = asyncio.run(manager.generate_groups(prompt_samples(ctx.tokenizer)[:2], 2, params()))
    assert [len(g.samples) for g in groups] == [4, 4]
    assert all(s.reward == 1.0 and s.response_length >= 1 for g in groups for s in g.samples)
    assert sorted(s.index for s in groups[1].samples) == [2, 3, 1002, 1003]
