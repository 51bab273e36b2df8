"""The built-in multi-turn generate function: the model calls tools (``--tools``) over up to ``--max-turns`` turns.

One sample is one conversation, grown token for token (token-in/token-out, see chat_turns.py)::

    prompt ids | turn 1 ids (generated, mask 1) | tool results + next header (appended, mask 0) | turn 2 ids | ...

Each turn is one engine call on everything so far (the engine's prefix cache keeps the earlier turns). A turn
that calls no tool, or that stops for another reason than its stop token, ends the conversation. The budget
``sampling_params.max_new_tokens`` (--rollout-max-response-len) counts every response token, generated or
appended; a conversation that runs out of it is TRUNCATED. ``sample.response`` is the last assistant turn's text
(what the reward judges); the whole conversation is in ``metadata["messages"]``. Per-sample tool statistics go to
``metadata["metrics"]`` and appear as rollout/tool_calls, rollout/used_tool, rollout/tool_errors, rollout/turns.
"""

from __future__ import annotations

import asyncio
import dataclasses

from sluice.engine.clients.protocol import GenerateRequest
from sluice.rollout.chat_turns import continuation_ids
from sluice.rollout.generate import SAMPLE_METRICS_KEY, STATUS_OF_FINISH, GenerateContext
from sluice.rollout.seeds import turn_seed
from sluice.rollout.tool_calls import parse_tool_calls
from sluice.types import Sample, SamplingParams, Status


async def generate_with_tools(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext) -> Sample:
    """Generate a tool-using conversation for ``sample`` (see the module docstring)."""
    if ctx.tools is None:
        raise ValueError("generate_with_tools needs tools: set --tools")
    tokenizer, budget = ctx.tokenizer, sampling_params.max_new_tokens
    tokens, mask, logprobs = list(sample.prompt_tokens), [], []
    messages: list[dict] = []
    num_calls = num_errors = num_turns = 0
    status, last_text = Status.COMPLETED, ""
    for turn in range(ctx.max_turns):
        room = budget - len(mask)
        if room <= 0:
            status = Status.TRUNCATED
            break
        params = dataclasses.replace(sampling_params, max_new_tokens=room, seed=turn_seed(sampling_params.seed, turn))
        request = GenerateRequest(list(tokens), params, group_key=f"conversation-{sample.index}")
        result = await ctx.client.generate(request)
        tokens += result.output_ids
        mask += [1] * len(result.output_ids)
        logprobs += list(result.output_logprobs)
        sample.weight_versions.append(result.weight_version)
        num_turns += 1
        last_text = result.text
        messages.append({"role": "assistant", "content": result.text})
        status = STATUS_OF_FINISH[result.finish_reason]
        calls = parse_tool_calls(tokenizer.decode(result.output_ids, skip_special_tokens=False))
        if status is not Status.COMPLETED or not calls or turn + 1 == ctx.max_turns:
            break
        answers = await asyncio.gather(*(ctx.tools.run(call) for call in calls))
        num_calls += len(calls)
        num_errors += sum(a["content"].startswith("error:") for a in answers)
        messages.extend(answers)
        appended = continuation_ids(tokenizer, result, list(answers), ctx.chat_template_kwargs)
        if len(appended) > budget - len(mask):
            status = Status.TRUNCATED
            break
        tokens += appended
        mask += [0] * len(appended)
        logprobs += [0.0] * len(appended)
    sample.tokens, sample.loss_mask, sample.rollout_log_probs = tokens, mask, logprobs
    sample.response_length = len(mask)
    sample.response = last_text
    sample.status = status
    sample.metadata["messages"] = messages
    sample.metadata[SAMPLE_METRICS_KEY] = {"tool_calls": float(num_calls), "used_tool": float(num_calls > 0),
                                           "tool_errors": float(num_errors), "turns": float(num_turns)}
    return sample
