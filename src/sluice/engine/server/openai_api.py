"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (plain and streamed).

Each choice is one engine request (n choices x prompts). Responses carry, besides OpenAI's fields, the raw
``token_ids`` of each choice and the ``prompt_token_ids`` (as vLLM and SGLang do), so an RL client gets exact
tokens and logprobs without re-tokenizing. Streamed choices are interleaved as their tokens come.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from sluice.engine.clients.protocol import GenerateRequest, GenerateResult, TopLogprobs
from sluice.engine.server.async_engine import TokenDelta, merge_streams
from sluice.engine.server.context import ServerContext
from sluice.engine.server.native_api import SSE_DONE, output_text, sse
from sluice.engine.server.openai_schema import ChatRequest, CompletionRequest, OpenAIRequest
from sluice.engine.server.stream_text import IncrementalText
from sluice.net.auth import Access
from sluice.net.http_errors import RequestError, read_body


@dataclass
class Call:
    """One /v1 request after tokenization: what is common to its choices."""

    body: OpenAIRequest
    chat: bool
    prompts: list[list[int]]  # token ids per prompt
    prompt_texts: list[str]  # each prompt as text (completions echo it)
    requests: list[GenerateRequest]  # prompt-major: choice k is prompt k // n, sample k % n
    id: str
    created: int

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def want_logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    @property
    def echoes(self) -> bool:
        """A completion with ``echo``: each choice starts with its prompt (and, with logprobs, its scores)."""
        return not self.chat and self.body.echo


def openai_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(dependencies=ctx.keys.dependency(Access.USER))

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": ctx.served_model_name, "object": "model", "created": int(ctx.started_at),
                                            "owned_by": "sluice", "root": ctx.model_path, "max_model_len": ctx.context_len}]}

    @router.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        raw_prompts = body.prompts()
        ctx.check_batch_size("prompt", len(raw_prompts) * body.n)  # before any tokenizing
        prompts = [(field, ctx.encode(field, p) if isinstance(p, str) else p) for field, p in raw_prompts]
        texts = [p if isinstance(p, str) else _decode(ctx, p) for _, p in raw_prompts] if body.echo else []
        return await _serve(ctx, _make_call(ctx, body, prompts, chat=False, prompt_texts=texts))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, ChatRequest)
        ctx.check_batch_size("n", body.n)
        return await _serve(ctx, _make_call(ctx, body, [("messages", _chat_prompt(ctx, body))], chat=True))

    return router


def _chat_prompt(ctx: ServerContext, body: ChatRequest) -> list[int]:
    tokenizer = ctx.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("messages", "no chat template (none in the checkpoint, or no tokenizer loaded); "
                                       "use /v1/completions with a templated prompt")
    try:
        text = tokenizer.apply_chat_template(
            [m.for_template() for m in body.messages], tokenize=False,
            add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
            continue_final_message=body.continue_final_message, **(body.chat_template_kwargs or {}))
    except Exception as error:  # noqa: BLE001 - template errors (raise_exception, bad roles) are the caller's
        raise RequestError("messages", f"the chat template failed: {error}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(ctx: ServerContext, ids: list[int]) -> str:
    return ctx.tokenizer.decode(ids) if ctx.tokenizer is not None else ""


def _make_call(ctx: ServerContext, body: OpenAIRequest, prompts: list[tuple[str, list[int]]], chat: bool,
               prompt_texts: list[str] | None = None) -> Call:
    requests = []
    single = len(prompts) * body.n == 1
    for field, ids in prompts:
        for index in range(body.n):
            params = body.sampling_params(max(ctx.context_len - len(ids), 1), index)
            rid = body.rid if single or body.rid is None else f"{body.rid}-{len(requests)}"
            requests.append(ctx.make_request(field, ids, params, return_logprob=True, rid=rid,
                                             max_tokens_field=body.max_tokens_field,
                                             top_logprobs_num=body.top_logprobs_num,
                                             top_logprobs_field=body.top_logprobs_field,
                                             logprob_start_len=body.logprob_start_len))
    ctx.admit(len(requests))
    prefix = "chatcmpl" if chat else "cmpl"
    return Call(body, chat, [ids for _, ids in prompts], prompt_texts or [], requests, f"{prefix}-{uuid.uuid4().hex}",
                int(time.time()))


async def _serve(ctx: ServerContext, call: Call):
    if call.body.stream:
        try:
            streams = [ctx.async_engine.open_stream(r) for r in call.requests]
        except ValueError as error:
            raise RequestError("prompt", str(error)) from None
        return StreamingResponse(_stream(ctx, call, streams), media_type="text/event-stream")
    try:
        results = await asyncio.gather(*(ctx.async_engine.generate(r) for r in call.requests))
    except ValueError as error:  # refused by the engine after our own checks passed
        raise RequestError("prompt", str(error)) from None
    choices = [_choice(ctx, call, k, result) for k, result in enumerate(results)]
    response = {"id": call.id, "object": call.object_name, "created": call.created, "model": ctx.served_model_name,
                "choices": choices, "usage": _usage(call, results)}
    if call.chat:
        response["prompt_token_ids"] = call.prompts[0]
    return response


def _usage(call: Call, results: list[GenerateResult]) -> dict:
    prompt_tokens = sum(len(p) for p in call.prompts)  # each prompt counted once, however many choices
    completion_tokens = sum(len(r.output_ids) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(ctx: ServerContext, call: Call, index: int, result: GenerateResult) -> dict:
    text = output_text(result, call.body.no_stop_trim)
    ids, logprobs, tops = result.output_ids, result.output_logprobs, result.output_top_logprobs
    if call.echoes:
        text = call.prompt_texts[index // call.body.n] + text
        ids, logprobs, tops = _echoed(call, index, ids, logprobs, tops, result.input_logprobs,
                                      result.input_top_logprobs)
    logprobs = _logprobs(ctx, call, ids, logprobs, tops) if call.want_logprobs() else None
    choice = {"index": index, "logprobs": logprobs, "finish_reason": result.finish_reason.value,
              "matched_stop": result.matched_stop, "token_ids": list(result.output_ids)}
    if call.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
        choice["prompt_token_ids"] = call.prompts[index // call.body.n]
    return choice


def _echoed(call: Call, index: int, ids: list[int], logprobs: list[float], tops: list[TopLogprobs],
            input_logprobs: list[float | None], input_tops: list[TopLogprobs | None]):
    """The prompt's tokens, their logprobs (the first None) and top candidates put before a choice's, for echo
    with logprobs (plain and streamed alike); the output's own lists unchanged otherwise."""
    if not call.want_logprobs():
        return ids, logprobs, tops
    tops = (input_tops + tops) if call.body.top_logprobs_num else []
    return call.prompts[index // call.body.n] + ids, input_logprobs + logprobs, tops


def _logprobs(ctx: ServerContext, call: Call, ids: list[int], logprobs: list[float], tops: list[TopLogprobs],
              offset: int = 0) -> dict:
    """OpenAI's shapes: chat ``{"content": [{token, logprob, bytes, top_logprobs}]}``; completions parallel lists,
    ``top_logprobs`` one ``{token text: logprob}`` per token."""
    pieces = [ctx.decode_token(t) for t in ids]
    tops = tops or [TopLogprobs([], [])] * len(ids)  # none asked for
    if call.chat:
        return {"content": [{**_chat_entry(piece, lp), "top_logprobs": _chat_top(ctx, top)}
                            for piece, lp, top in zip(pieces, logprobs, tops)]}
    offsets, position = [], offset
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    top_dicts = [None if top is None or lp is None else _completion_top(ctx, top, piece, lp)
                 for piece, lp, top in zip(pieces, logprobs, tops)]
    return {"tokens": pieces, "token_logprobs": list(logprobs), "top_logprobs": top_dicts, "text_offset": offsets}


def _chat_entry(piece: str, logprob: float) -> dict:
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


def _chat_top(ctx: ServerContext, top: TopLogprobs) -> list[dict]:
    return [_chat_entry(ctx.decode_token(t), lp) for t, lp in zip(top.token_ids, top.logprobs)]


def _completion_top(ctx: ServerContext, top: TopLogprobs, sampled_piece: str, sampled_logprob: float) -> dict:
    """The ``logprobs`` most likely tokens plus the sampled one (OpenAI: "up to logprobs+1 elements"). Keyed by
    text, as OpenAI's format is: two tokens that decode to the same text share one key, the likelier one's."""
    entries = {sampled_piece: sampled_logprob}
    for token_id, logprob in zip(reversed(top.token_ids), reversed(top.logprobs)):  # likeliest written last
        entries[ctx.decode_token(token_id)] = logprob
    return dict(sorted(entries.items(), key=lambda item: -item[1]))


async def _stream(ctx: ServerContext, call: Call, streams) -> AsyncIterator[str]:
    """Chunks of every choice as their tokens come. With echo, a choice's first chunk (its first tokens, or its
    end when it samples none) starts with the prompt's text and, with logprobs, the prompt's scores, as the plain
    response does. Completions' ``text_offset`` runs on across a choice's chunks."""
    texts = [IncrementalText(ctx.tokenizer, r.sampling_params.skip_special_tokens, r.sampling_params.stop)
             for r in call.requests]
    results: list[GenerateResult | None] = [None] * len(streams)
    to_echo = [call.echoes] * len(streams)
    offsets = [0] * len(streams)  # each choice's text offset after its chunks so far
    if call.chat:
        for index in range(len(streams)):
            yield sse(_chunk(ctx, call, index, {"delta": {"role": "assistant", "content": ""}, "token_ids": []}))
    try:
        async for index, event in merge_streams(streams):
            if isinstance(event, TokenDelta):
                piece = texts[index].push(event.output_ids)
                output_ids, scored = event.output_ids, (event.output_ids, event.output_logprobs,
                                                        event.output_top_logprobs)
                prompt_scores, finish = (streams[index].input_logprobs, streams[index].input_top_logprobs), None
            else:
                results[index] = event
                piece = texts[index].finish(output_text(event, call.body.no_stop_trim))
                output_ids, scored = [], ([], [], [])
                prompt_scores, finish = (event.input_logprobs, event.input_top_logprobs), event.finish_reason.value
            if to_echo[index]:
                to_echo[index] = False
                piece = call.prompt_texts[index // call.body.n] + piece
                scored = _echoed(call, index, *scored, *prompt_scores)
            fields = _delta(ctx, call, piece, output_ids, scored, offsets[index], finish)
            if fields["logprobs"] is not None and not call.chat:
                offsets[index] += sum(len(token) for token in fields["logprobs"]["tokens"])
            yield sse(_chunk(ctx, call, index, fields))
    except Exception as error:  # noqa: BLE001 - headers are sent; report in-band
        yield sse({"error": {"message": f"generation failed: {error}", "type": "server_error", "code": 500}})
    if call.body.stream_options and call.body.stream_options.include_usage and all(results):
        yield sse({"id": call.id, "object": f"{call.object_name}.chunk", "created": call.created,
                   "model": ctx.served_model_name, "choices": [], "usage": _usage(call, results)})
    yield SSE_DONE


def _delta(ctx: ServerContext, call: Call, piece: str, output_ids: list[int], scored, offset: int,
           finish_reason: str | None = None) -> dict:
    """One chunk's fields: ``scored`` the (token ids, logprobs, top candidates) its logprobs cover (the echoed
    prompt's first), ``offset`` the text offset of its first token."""
    ids, logprobs, tops = scored
    fields = {"finish_reason": finish_reason, "token_ids": list(output_ids),
              "logprobs": _logprobs(ctx, call, ids, logprobs, tops, offset) if call.want_logprobs() and ids else None}
    if call.chat:
        fields["delta"] = {"content": piece} if piece or finish_reason is None else {}
    else:
        fields["text"] = piece
    return fields


def _chunk(ctx: ServerContext, call: Call, index: int, fields: dict) -> dict:
    choice = {"index": index, "logprobs": None, "finish_reason": None, **fields}
    return {"id": call.id, "object": f"{call.object_name}.chunk", "created": call.created,
            "model": ctx.served_model_name, "choices": [choice]}
