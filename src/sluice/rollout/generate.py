"""The generate-function contract, the default single-turn generate function, and loading a custom one.

Contract (``--custom-generate-function-path``): ``async generate(sample, sampling_params, ctx) -> Sample |
list[Sample]``. It must set ``tokens`` (prompt + response), ``response``, ``response_length``, ``loss_mask`` (per
response token, 0 for tokens the model did not generate), ``rollout_log_probs`` (per response token) and
``status`` of the returned sample(s); it may set ``reward`` (then no reward function is called for it) and
``metadata[SAMPLE_METRICS_KEY]`` (numbers averaged into the rollout metrics). A list is a fan-out: every sample
of it is trained, in the group of the prompt. slime's ``async generate(args, sample, sampling_params: dict)`` is
accepted too (told apart by its first parameter, named ``args``); it reaches the engine through the gateway's
SGLang-style ``/generate`` at ``args.sglang_router_ip:args.sglang_router_port``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sluice.engine.clients.protocol import EngineClient, FinishReason, GenerateRequest
from sluice.plugins import Contract, load_plugin
from sluice.types import Sample, SamplingParams, Status

if TYPE_CHECKING:
    from sluice.rollout.tools import ToolBox

SAMPLE_METRICS_KEY = "metrics"  # sample.metadata[...]: {name: number}, averaged as rollout/<name>
FLAG = "--custom-generate-function-path"
CONTRACT = Contract(FLAG, "async fn(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext) -> "
                          "Sample | list[Sample]", 3,
                    "async fn(args, sample, sampling_params: dict) -> Sample | list[Sample]", 3)

STATUS_OF_FINISH = {
    FinishReason.STOP: Status.COMPLETED,
    FinishReason.LENGTH: Status.TRUNCATED,
    FinishReason.ABORT: Status.ABORTED,
}


@dataclass
class GenerateContext:
    """What a generate function may use: an engine client and the tokenizer, never the whole config."""

    client: EngineClient
    tokenizer: Any
    tools: ToolBox | None = None  # --tools, for multi-turn generation
    max_turns: int = 1  # --max-turns
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # --apply-chat-template-kwargs


async def generate_single_turn(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext) -> Sample:
    """One engine call: the response is every generated token, all trained (loss mask 1).

    A sample aborted part-way (--partial-rollout) continues where it stopped: the engine is given the prompt and
    the response so far, and the new tokens, logprobs and mask entries are appended (the earlier ones keep
    theirs). Stop strings are matched in the new text only.
    """
    resumed = sample.status == Status.ABORTED and len(sample.tokens) > len(sample.prompt_tokens)
    params = dataclasses.replace(sampling_params)
    if resumed:
        params.max_new_tokens = max(sampling_params.max_new_tokens - sample.response_length, 1)
        context = list(sample.tokens)
    else:
        context = list(sample.prompt_tokens)
        sample.response, sample.loss_mask, sample.rollout_log_probs = "", [], []
    result = await ctx.client.generate(GenerateRequest(context, params, return_logprob=True))
    sample.tokens = context + result.output_ids
    sample.response += result.text
    sample.response_length = len(sample.tokens) - len(sample.prompt_tokens)
    sample.loss_mask += [1] * len(result.output_ids)
    sample.rollout_log_probs += list(result.output_logprobs)
    # every version that sampled a token (a request living through a weight update has two); the oldest is
    # the sample's policy version, by which the buffer bounds staleness
    for version in sorted(set(result.weight_versions or [result.weight_version])):
        if version not in sample.weight_versions:
            sample.weight_versions.append(version)
    sample.status = STATUS_OF_FINISH[result.finish_reason]
    return sample


generate_single_turn.resumes_partial = True  # continue_group hands it aborted samples as they are


def sglang_sampling_params(params: SamplingParams) -> dict[str, Any]:
    """``params`` under SGLang's names, as slime's generate functions receive them."""
    out = dataclasses.asdict(params)
    out["sampling_seed"] = out.pop("seed")
    return {key: value for key, value in out.items() if value is not None}


def check_generated(sample: Sample, source: str) -> Sample:
    """Refuse a sample a custom generate function left inconsistent, naming the field (fails only that sample)."""
    prompt = list(sample.prompt_tokens)
    if list(sample.tokens[: len(prompt)]) != prompt:
        raise ValueError(f"{source}: sample {sample.index}: tokens must start with prompt_tokens")
    num_response = len(sample.tokens) - len(prompt)
    if sample.response_length != num_response:
        raise ValueError(f"{source}: sample {sample.index}: response_length {sample.response_length} != "
                         f"len(tokens) - len(prompt_tokens) = {num_response}")
    for name in ("loss_mask", "rollout_log_probs"):
        values = getattr(sample, name)
        if values and len(values) != num_response:
            raise ValueError(f"{source}: sample {sample.index}: {name} has {len(values)} entries for "
                             f"{num_response} response tokens")
    if not isinstance(sample.status, Status):  # slime's Sample.Status members carry the same string values
        sample.status = Status(getattr(sample.status, "value", sample.status))
    return sample


def load_generate_fn(path: str, slime_args: Any = None):
    """The generate function at ``path`` as sluice's ``(sample, sampling_params, ctx)``; errors name the flag."""
    plugin = load_plugin(path, CONTRACT)
    if not plugin.is_async:
        raise_not_async(path)
    fn = plugin.fn

    async def generate(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext):
        if plugin.slime_form:
            out = await fn(slime_args, sample, sglang_sampling_params(sampling_params))
        else:
            out = await fn(sample, sampling_params, ctx)
        produced = out if isinstance(out, list) else [out]
        for item in produced:
            if not isinstance(item, Sample):
                raise TypeError(f"{path}: returned a {type(item).__name__}; expected Sample or list[Sample]")
            check_generated(item, path)
        return out

    generate.__name__ = generate.__qualname__ = plugin.name
    generate.plugin_path = path  # how failure reports name the function: as the user wrote it
    generate.slime_form = plugin.slime_form  # the run starts the gateway for slime's HTTP calls
    # --partial-rollout hands an aborted sample back as it is only to a function that says it continues one
    generate.resumes_partial = getattr(fn, "resumes_partial", False) and not plugin.slime_form
    return generate


def raise_not_async(path: str) -> None:
    from sluice.plugins import PluginSignatureError

    raise PluginSignatureError(f"{FLAG} {path!r}: the function is not async; expected {CONTRACT.expected()}")
