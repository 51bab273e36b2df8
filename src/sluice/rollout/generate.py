"""The default single-turn generate function and the context every generate function receives.

Contract (plug-ins follow it too): ``async generate(sample, sampling_params, ctx) -> Sample | list[Sample]``.
It must set ``tokens``, ``response``, ``response_length``, ``loss_mask``, ``rollout_log_probs``,
``weight_versions`` and ``status`` of the returned sample(s).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sluice.engine.protocol import EngineClient, FinishReason, GenerateRequest
from sluice.types import Sample, SamplingParams, Status

_STATUS_OF_FINISH = {
    FinishReason.STOP: Status.COMPLETED,
    FinishReason.LENGTH: Status.TRUNCATED,
    FinishReason.ABORT: Status.ABORTED,
}


@dataclass
class GenerateContext:
    """What a generate function may use: an engine client and the tokenizer, never the whole config."""

    client: EngineClient
    tokenizer: Any


async def generate_single_turn(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext) -> Sample:
    """One engine call: the response is every generated token, all trained (loss mask 1)."""
    params = dataclasses.replace(sampling_params)
    result = await ctx.client.generate(GenerateRequest(list(sample.prompt_tokens), params, return_logprob=True))
    sample.tokens = list(sample.prompt_tokens) + result.output_ids
    sample.response = result.text
    sample.response_length = len(result.output_ids)
    sample.loss_mask = [1] * sample.response_length
    sample.rollout_log_probs = list(result.output_logprobs)
    sample.weight_versions.append(result.weight_version)
    sample.status = _STATUS_OF_FINISH[result.finish_reason]
    return sample
