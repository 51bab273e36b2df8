"""Rollout, generate and eval plug-ins."""

from __future__ import annotations

import dataclasses

from sluice.rollout import EvalRequest, GenerateContext, RolloutOutput, RolloutRequest, generate_single_turn, turn_seed
from sluice.types import Sample, SamplingParams


async def hardest_first(request: RolloutRequest) -> RolloutOutput:
    """--rollout-function-path: draw twice the prompts, generate them all, train on the groups with the lowest
    mean reward (the ones the model finds hardest); the share of solved groups is logged."""
    prompts = request.source.next_batch(2 * request.num_groups)
    groups = await request.manager.generate_groups(prompts, request.n_samples, request.sampling_params,
                                                   first_index=request.first_index)
    mean = [sum(request.manager.rewards(g)) / len(g.samples) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: mean[i])[: request.num_groups]
    solved = sum(m >= 1.0 for m in mean) / len(mean)
    return RolloutOutput([groups[i] for i in sorted(order)], {"rollout/solved_groups_frac": solved})


async def retry_once(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext) -> Sample:
    """--custom-generate-function-path: regenerate a response that hit the length limit, with a fresh budget
    for the retry; the sample keeps only the second attempt."""
    first = await generate_single_turn(dataclasses.replace(sample, weight_versions=[]), sampling_params, ctx)
    if first.status.value != "truncated":
        return first
    # a seed of its own: the sample's seed from the same prompt would draw the same response again
    retry = dataclasses.replace(sampling_params, seed=turn_seed(sampling_params.seed, 1))
    return await generate_single_turn(sample, retry, ctx)


async def two_answers(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext) -> list[Sample]:
    """Fan-out: two independent responses from one generate call, both trained in the prompt's group."""
    other = dataclasses.replace(sample, metadata=dict(sample.metadata), weight_versions=[])
    second = dataclasses.replace(sampling_params, seed=turn_seed(sampling_params.seed, 1))  # else: the same answer
    return [await generate_single_turn(sample, sampling_params, ctx),
            await generate_single_turn(other, second, ctx)]


async def accuracy_by_task(request: EvalRequest) -> dict[str, float]:
    """--eval-function-path: greedy accuracy per eval set and per metadata['task']."""
    metrics: dict[str, float] = {}
    for name, prompts in request.eval_sets.items():
        groups = await request.manager.generate_groups(prompts, request.n_samples, request.sampling_params,
                                                       shape_rewards=False)
        samples = [s for g in groups for s in g.samples]
        metrics[f"eval/{name}/accuracy"] = sum(s.reward == 1.0 for s in samples) / len(samples)
        for task in sorted({s.metadata.get("task", "none") for s in samples}):
            of_task = [s for s in samples if s.metadata.get("task", "none") == task]
            metrics[f"eval/{name}/{task}_accuracy"] = sum(s.reward == 1.0 for s in of_task) / len(of_task)
    return metrics
