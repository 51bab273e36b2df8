"""RolloutManager: turns prompt samples into scored groups of responses through the engine client."""

from __future__ import annotations

import asyncio
import copy
import statistics
from dataclasses import dataclass
from typing import Awaitable, Callable

from sluice.rewards import RewardFn, score_samples
from sluice.rewards.overlong import OverlongShaping
from sluice.rollout.generate import GenerateContext, generate_single_turn
from sluice.types import Sample, SampleGroup, SamplingParams, Status

GenerateFn = Callable[[Sample, SamplingParams, GenerateContext], Awaitable["Sample | list[Sample]"]]


@dataclass
class RolloutManager:
    ctx: GenerateContext
    reward_fn: RewardFn
    max_concurrency: int = 256
    generate_fn: GenerateFn = generate_single_turn
    reward_key: str | None = None
    overlong: OverlongShaping | None = None  # DAPO soft overlong punishment of training rollouts

    async def generate_groups(
        self, prompts: list[Sample], n_samples: int, sampling_params: SamplingParams, first_index: int = 0,
        shape_rewards: bool = True,
    ) -> list[SampleGroup]:
        """n_samples responses per prompt, generated concurrently and scored; one group per prompt.

        ``shape_rewards=False`` (evaluation) leaves the rewards as scored, without the overlong penalty.
        """
        gate = asyncio.Semaphore(self.max_concurrency)

        async def run_one(sample: Sample) -> list[Sample]:
            async with gate:
                try:
                    out = await self.generate_fn(sample, sampling_params, self.ctx)
                except Exception as error:  # a broken generate call fails its sample, not the rollout
                    sample.status = Status.FAILED
                    sample.metadata["generate_error"] = f"{type(error).__name__}: {error}"
                    return [sample]
            return out if isinstance(out, list) else [out]

        groups = []
        for group_index, prompt in enumerate(prompts):
            members = []
            for k in range(n_samples):
                sample = copy.deepcopy(prompt)
                sample.group_index, sample.index = group_index, first_index + group_index * n_samples + k
                members.append(sample)
            groups.append(members)
        outputs = await asyncio.gather(*(run_one(s) for members in groups for s in members))
        flat = [s for out in outputs for s in out]
        await score_samples(self.reward_fn, [s for s in flat if s.status != Status.FAILED], self.max_concurrency)
        if shape_rewards and self.overlong is not None:
            self.overlong.apply(flat)
        by_group: dict[int, list[Sample]] = {}
        for sample in flat:
            by_group.setdefault(sample.group_index, []).append(sample)
        return [SampleGroup(by_group[i]) for i in sorted(by_group)]

    def rewards(self, group: SampleGroup) -> list[float]:
        return [s.scalar_reward(self.reward_key) if s.reward is not None else 0.0 for s in group.samples]


def rollout_metrics(groups: list[SampleGroup], manager: RolloutManager, prefix: str = "rollout") -> dict[str, float]:
    """Reward, accuracy-style and length statistics of a set of groups."""
    samples = [s for g in groups for s in g.samples]
    rewards = [r for g in groups for r in manager.rewards(g)]
    lengths = [s.response_length for s in samples]
    out = {
        f"{prefix}/reward_mean": statistics.fmean(rewards) if rewards else 0.0,
        f"{prefix}/response_len_mean": statistics.fmean(lengths) if lengths else 0.0,
        f"{prefix}/truncated_frac": sum(s.status == Status.TRUNCATED for s in samples) / max(len(samples), 1),
        f"{prefix}/failed_frac": sum(s.status == Status.FAILED for s in samples) / max(len(samples), 1),
        f"{prefix}/num_samples": float(len(samples)),
    }
    if manager.overlong is not None:
        penalties = [s.metadata["overlong_penalty"] for s in samples if "overlong_penalty" in s.metadata]
        out[f"{prefix}/overlong_penalty_mean"] = statistics.fmean(penalties) if penalties else 0.0
    return out
