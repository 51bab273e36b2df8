"""``POST /generate``, SGLang's native generation endpoint, plain and streamed.

A streamed response follows SGLang's default (non-incremental) format: every ``data:`` chunk carries the output
so far (text, output_ids, logprobs) and the prompt's logprobs when asked for, the last one is the complete response with its finish reason, and
``data: [DONE]`` ends the stream. Text that may be the start of a stop string is held back until it is not.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from sluice.engine.clients.protocol import FinishReason, GenerateRequest, GenerateResult, TopLogprobs
from sluice.engine.server.async_engine import TokenDelta, TokenStream
from sluice.engine.server.context import ServerContext
from sluice.engine.server.native_schema import GenerateBody, GenerateItem
from sluice.engine.server.stream_text import IncrementalText
from sluice.net.auth import Access
from sluice.net.http_errors import RequestError, read_body


def native_generate_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(dependencies=ctx.keys.dependency(Access.USER))

    @router.post("/generate")
    async def generate(request: Request):
        started = time.perf_counter()
        body = await read_body(request, GenerateBody)
        items = body.items()
        ctx.check_batch_size("text" if body.text is not None else "input_ids", len(items))
        requests = [_to_request(ctx, item) for item in items]
        ctx.admit(len(requests))
        if body.stream:
            stream = _open_stream(ctx, requests[0])
            events = _stream_events(ctx, stream, items[0], body.return_text_in_logprobs, started)
            return StreamingResponse(events, media_type="text/event-stream")
        outcomes = await asyncio.gather(*(ctx.async_engine.generate(r) for r in requests), return_exceptions=True)
        outputs = []
        for item, sent, outcome in zip(items, requests, outcomes):
            if isinstance(outcome, ValueError):
                raise RequestError(item.field, str(outcome))
            if isinstance(outcome, BaseException):
                raise outcome
            outputs.append(native_output(ctx, outcome, item, sent.input_ids, body.return_text_in_logprobs,
                                         started))
        return outputs if body.is_batch else outputs[0]

    return router


def _to_request(ctx: ServerContext, item: GenerateItem) -> GenerateRequest:
    input_ids = ctx.encode(item.field, item.prompt) if isinstance(item.prompt, str) else item.prompt
    params = item.sampling_params.to_sampling_params(max(ctx.context_len - len(input_ids), 1))
    return ctx.make_request(item.field, input_ids, params, item.return_logprob, item.rid,
                            max_tokens_field=f"{item.params_field}.max_new_tokens",
                            top_logprobs_num=item.top_logprobs_num, top_logprobs_field=item.top_logprobs_field,
                            logprob_start_len=item.logprob_start_len, logprob_start_field=item.logprob_start_field,
                            token_ids_logprob=item.token_ids_logprob, token_ids_field=item.token_ids_field)


def _open_stream(ctx: ServerContext, request: GenerateRequest) -> TokenStream:
    try:
        return ctx.async_engine.open_stream(request)
    except ValueError as error:
        raise RequestError("input_ids", str(error)) from None


def finish_reason_json(result: GenerateResult) -> dict:
    """SGLang's shape: ``{"type": "stop", "matched": 2}``, ``{"type": "length", "length": n}``, ``{"type": "abort"}``."""
    reason: dict = {"type": result.finish_reason.value, "matched": result.matched_stop}
    if result.finish_reason is FinishReason.LENGTH:
        reason["length"] = len(result.output_ids)
    elif result.finish_reason is FinishReason.ABORT:
        reason["message"] = "aborted"
    return reason


def output_text(result: GenerateResult, no_stop_trim: bool) -> str:
    """The engine trims a matched stop string; ``no_stop_trim`` puts it back, as SGLang does."""
    if no_stop_trim and isinstance(result.matched_stop, str):
        return result.text + result.matched_stop
    return result.text


def _logprob_triples(ctx: ServerContext, ids: list[int], logprobs: list[float], with_text: bool) -> list[list]:
    """``[[logprob, token_id, token_text | None], ...]`` as in SGLang's ``output_token_logprobs``."""
    return [[lp, tid, ctx.decode_token(tid) if with_text else None] for lp, tid in zip(logprobs, ids)]


def _top_triples(ctx: ServerContext, tops: list[TopLogprobs | None], with_text: bool) -> list[list[list] | None]:
    """SGLang's ``output_top_logprobs``/``input_top_logprobs``: per token, its top candidates as triples, most
    likely first (None where there are none: the first prompt position)."""
    return [None if top is None else _logprob_triples(ctx, top.token_ids, top.logprobs, with_text) for top in tops]


def _named_triples(ctx: ServerContext, token_ids: list[int], positions: list[list[float] | None],
                   with_text: bool) -> list[list[list] | None]:
    """SGLang's ``output_token_ids_logprobs``/``input_token_ids_logprobs``: per token, the named ids' logprobs as
    triples in the request's order (None where there are none: the first prompt position)."""
    return [None if values is None else _logprob_triples(ctx, token_ids, values, with_text) for values in positions]


def _input_triples(ctx: ServerContext, prompt: list[int], logprobs: list[float | None], with_text: bool) -> list[list]:
    """SGLang's ``input_token_logprobs``: the prompt tokens from logprob_start_len on, the first logprob None."""
    return _logprob_triples(ctx, prompt[len(prompt) - len(logprobs) :], logprobs, with_text)



def native_output(ctx: ServerContext, result: GenerateResult, item: GenerateItem, prompt: list[int],
                  with_text: bool, started: float) -> dict:
    meta = {
        "id": result.rid,
        "finish_reason": finish_reason_json(result),
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.output_ids),
        "cached_tokens": result.cached_tokens,
        "weight_version": str(result.weight_version),
        "e2e_latency": time.perf_counter() - started,
    }
    if result.weight_versions:  # sluice's extension: which weights sampled which tokens, as [version, count] runs
        meta["weight_version_runs"] = version_runs(result.weight_versions)
    if item.return_logprob:
        meta["input_token_logprobs"] = _input_triples(ctx, prompt, result.input_logprobs, with_text)
        meta["output_token_logprobs"] = _logprob_triples(ctx, result.output_ids, result.output_logprobs, with_text)
    if item.top_logprobs_num:
        meta["input_top_logprobs"] = _top_triples(ctx, result.input_top_logprobs, with_text)
        meta["output_top_logprobs"] = _top_triples(ctx, result.output_top_logprobs, with_text)
    if item.token_ids_logprob:
        named = item.token_ids_logprob
        meta["input_token_ids_logprobs"] = _named_triples(ctx, named, result.input_token_ids_logprobs, with_text)
        meta["output_token_ids_logprobs"] = _named_triples(ctx, named, result.output_token_ids_logprobs, with_text)
    text = output_text(result, item.sampling_params.no_stop_trim)
    return {"text": text, "output_ids": list(result.output_ids), "meta_info": meta}


def version_runs(versions: list[int]) -> list[list[int]]:
    """``[3, 3, 4]`` -> ``[[3, 2], [4, 1]]``: per-token weight versions, run-length encoded."""
    runs: list[list[int]] = []
    for version in versions:
        if runs and runs[-1][0] == version:
            runs[-1][1] += 1
        else:
            runs.append([version, 1])
    return runs


def _partial_output(ctx: ServerContext, stream: TokenStream, text: str, ids: list[int],
                    logprobs: list[float], tops: list[TopLogprobs], named: list[list[float]], with_text: bool) -> dict:
    """A chunk before the last: the output so far, and the prompt logprobs (known from the first chunk on)."""
    request = stream.request
    meta = {"id": request.rid, "finish_reason": None, "prompt_tokens": len(request.input_ids),
            "completion_tokens": len(ids), "cached_tokens": 0, "weight_version": str(ctx.engine.weight_version)}
    if request.return_logprob:
        meta["input_token_logprobs"] = _input_triples(ctx, request.input_ids, stream.input_logprobs, with_text)
        meta["output_token_logprobs"] = _logprob_triples(ctx, ids, logprobs, with_text)
    if request.top_logprobs_num:
        meta["input_top_logprobs"] = _top_triples(ctx, stream.input_top_logprobs, with_text)
        meta["output_top_logprobs"] = _top_triples(ctx, tops, with_text)
    if request.token_ids_logprob:
        meta["input_token_ids_logprobs"] = _named_triples(ctx, request.token_ids_logprob,
                                                          stream.input_token_ids_logprobs, with_text)
        meta["output_token_ids_logprobs"] = _named_triples(ctx, request.token_ids_logprob, named, with_text)
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def _stream_events(ctx: ServerContext, stream: TokenStream, item: GenerateItem, with_text: bool,
                         started: float) -> AsyncIterator[str]:
    params = item.sampling_params
    text = IncrementalText(ctx.tokenizer, params.skip_special_tokens, params.stop_list)
    ids: list[int] = []
    logprobs: list[float] = []
    tops: list[TopLogprobs] = []
    named: list[list[float]] = []
    try:
        async for event in stream:
            if isinstance(event, TokenDelta):
                ids += event.output_ids
                logprobs += event.output_logprobs
                tops += event.output_top_logprobs
                named += event.output_token_ids_logprobs
                text.push(event.output_ids)
                yield sse(_partial_output(ctx, stream, text.sent, ids, logprobs, tops, named, with_text))
            else:
                yield sse(native_output(ctx, event, item, stream.request.input_ids, with_text, started))
    except Exception as error:  # noqa: BLE001 - the status line is already sent; report in-band as SGLang does
        yield sse({"error": {"message": f"generation failed: {error}", "type": "server_error", "code": 500}})
    finally:
        stream.close()
    yield SSE_DONE
