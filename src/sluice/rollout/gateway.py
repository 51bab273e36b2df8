"""The agent gateway: an OpenAI-compatible endpoint on 127.0.0.1 in front of the run's engine, recording every
chat completion of a session token for token (sessions.py), so agent programs written against the ``openai``
client train without changes.

Routes:
- ``POST /sessions/{id}/v1/chat/completions``, ``GET /sessions/{id}/v1/models``: a session's OpenAI base URL is
  ``{url}/sessions/{id}/v1``. Sampling uses the run's settings (temperature, top-p, top-k: the trainer computes
  logprobs under them); the agent's ``max_tokens`` and ``stop`` apply within the session's token budget.
  With ``tools`` in the request, ``<tool_call>`` blocks of the output come back as OpenAI ``tool_calls``.
  Responses carry ``prompt_token_ids`` and ``choices[i].token_ids`` besides OpenAI's fields; not streamed.
- ``POST /generate``: SGLang's native endpoint (token ids or text in, ids and logprobs out, no recording), which
  slime-style generate functions reach at ``args.sglang_router_ip:sglang_router_port``.

Access: the gateway listens on 127.0.0.1 unless given another host, which needs an ``api_key``. With a key, every
route needs ``Authorization: Bearer <key>`` (agents get it as ``AgentTask.api_key``, which the openai client
sends). Bodies past ``max_body_bytes`` get 413. The engines behind it are reached through the run's client, which
carries the run's key to them.

Threads: uvicorn runs the app on its own event loop in a daemon thread; engine calls go through the run's
client from that loop. Sessions are opened and closed from the rollout's thread (sessions.py guards them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from sluice.engine.clients.protocol import EngineClient, FinishReason, GenerateRequest, GenerateResult
from sluice.engine.server.native_schema import WireSamplingParams
from sluice.net.auth import Access, ApiKeys, check_exposure
from sluice.net.body_limit import MIB, BodyLimit
from sluice.net.http_errors import RequestError, install_error_handlers, read_body
from sluice.net.listener import bind_listener, start_in_thread
from sluice.rollout.chat_turns import continuation_ids
from sluice.rollout.seeds import turn_seed
from sluice.rollout.sessions import Session, SessionTable, Turn, continued_turn, current_segment
from sluice.rollout.tool_calls import parse_tool_calls
from sluice.types import SamplingParams

PLACEHOLDER_API_KEY = "sluice"  # handed to agents when the gateway has no key: the openai client insists on one
MAX_BODY_BYTES = 64 * MIB  # chat histories and tool schemas; far past what an agent's context holds


class ChatBody(BaseModel):
    """A chat completion request; fields an agent sends that do not apply here are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    logprobs: bool = False
    n: int = Field(1, ge=1, le=1)
    stream: bool = False


class NativeBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_ids: list[int] | None = None
    text: str | None = None
    sampling_params: WireSamplingParams = Field(default_factory=WireSamplingParams)
    return_logprob: bool = False


class AgentGateway:
    def __init__(self, client: EngineClient, tokenizer: Any, context_len: int, model_name: str = "sluice-policy",
                 chat_template_kwargs: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        """``api_key``: the key every route needs (None: none, on loopback only)."""
        self.client, self.tokenizer, self.context_len = client, tokenizer, context_len
        self.model_name = model_name
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.sessions = SessionTable()
        self.keys = ApiKeys(api_key)
        self.max_body_bytes = max_body_bytes
        check_exposure(host, self.keys, False, "the agent gateway", "api_key", allow_flag=None)
        self.listener = bind_listener(host, port, "the agent gateway")
        self.host, self.port = host, self.listener.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self._app(), log_level="warning"))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._serve, name="sluice-gateway", daemon=True)

    # ---- lifecycle (rollout thread) -----------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> "AgentGateway":
        start_in_thread(self.server, self.thread, f"the agent gateway at {self.url}", timeout_s)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def _serve(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.listener])

        asyncio.run(serve())

    def base_url(self, session: Session) -> str:
        return f"{self.url}/sessions/{session.id}/v1"

    @property
    def agent_api_key(self) -> str:
        """What agents pass as the openai client's ``api_key``."""
        return self.keys.api_key or PLACEHOLDER_API_KEY

    def open_session(self, sampling_params: SamplingParams, budget: int) -> Session:
        return self.sessions.open(sampling_params, budget)

    def close_session(self, session: Session) -> list[Turn]:
        """Close ``session``: later requests get 404, requests in flight are aborted; returns its turns."""
        turns, in_flight = self.sessions.close(session)
        if in_flight and self.loop is not None and not self.loop.is_closed():
            for rid in in_flight:
                asyncio.run_coroutine_threadsafe(self.client.abort(rid), self.loop)
        return turns

    # ---- HTTP (gateway thread) ----------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app = FastAPI(title="sluice agent gateway", docs_url=None, redoc_url=None,
                      dependencies=self.keys.dependency(Access.USER))
        install_error_handlers(app)
        app.add_middleware(BodyLimit, max_bytes=self.max_body_bytes, flag="the agent gateway's limit")

        @app.get("/sessions/{session_id}/v1/models")
        async def models(session_id: str):
            self._session(session_id)
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "sluice"}]}

        @app.post("/sessions/{session_id}/v1/chat/completions")
        async def chat(session_id: str, request: Request):
            session = self._session(session_id)
            body = await read_body(request, ChatBody)
            if body.stream:
                raise RequestError("stream", "the agent gateway does not stream; send stream=false")
            return await self._complete(session, body)

        @app.post("/generate")
        async def generate(request: Request):
            return await self._native(await read_body(request, NativeBody))

        return app

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise RequestError("", f"no open session {session_id!r} (the sample's rollout is over)", status=404)
        return session

    def _prompt(self, session: Session, body: ChatBody) -> tuple[list[int], bool]:
        """(prompt ids, continues the previous turn token-wise)."""
        kwargs = {**self.chat_template_kwargs, **({"tools": body.tools} if body.tools else {})}
        continued = continued_turn(session.turns, body.messages)
        if continued is not None:
            last, new_messages = continued
            appended = continuation_ids(self.tokenizer, last.result, new_messages, kwargs)
            return last.prompt_ids + last.output_ids + appended, True
        try:
            text = self.tokenizer.apply_chat_template(body.messages, tokenize=False, add_generation_prompt=True,
                                                      **kwargs)
        except Exception as error:  # noqa: BLE001 - the agent's messages do not fit the template
            raise RequestError("messages", f"the chat template failed: {error}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False)), False

    async def _complete(self, session: Session, body: ChatBody) -> dict:
        prompt_ids, continues = self._prompt(session, body)
        # The budget counts the segment's response tokens: generated so far, appended, and about to be generated.
        spent = len(prompt_ids) - len(current_segment(session.turns)[0].prompt_ids) if continues else 0
        room = min(session.budget - spent, self.context_len - len(prompt_ids))
        if room < 1:
            raise RequestError("messages", "the session's token budget (--rollout-max-response-len) or the context "
                                           "length is used up")
        wanted = body.max_completion_tokens or body.max_tokens or room
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        rid = uuid.uuid4().hex
        number = self.sessions.track(session, rid)
        if number is None:
            raise RequestError("", f"session {session.id!r} closed (the sample's rollout is over)", status=404)
        # one seed per request of the session (the sample's seed derived by request number): an agent's re-rendered
        # history may put a later turn at the positions of an earlier one, and an agent asking for several
        # completions of one context at once (best-of-n) must not get the same one n times
        seed = turn_seed(session.sampling_params.seed, number)
        params = dataclasses.replace(session.sampling_params, max_new_tokens=min(wanted, room),
                                     stop=list(session.sampling_params.stop) + stop, seed=seed)
        request = GenerateRequest(prompt_ids, params, return_logprob=True, rid=rid, group_key=f"session-{session.id}")
        try:
            result = await self.client.generate(request)
        finally:
            self.sessions.untrack(session, request.rid)
        reply = self._reply(result, with_tools=bool(body.tools))
        self.sessions.record(session, Turn(list(body.messages), prompt_ids, result, reply, continues))
        return self._chat_response(prompt_ids, result, reply, body.logprobs)

    def _reply(self, result: GenerateResult, with_tools: bool) -> dict[str, Any]:
        text = self.tokenizer.decode(result.output_ids, skip_special_tokens=False)
        calls = parse_tool_calls(text) if with_tools else []
        if not calls or any(call.error for call in calls):
            return {"role": "assistant", "content": result.text}
        content = result.text.split("<tool_call>", 1)[0].strip() or None
        tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": call.name, "arguments": json.dumps(call.arguments)}} for call in calls]
        return {"role": "assistant", "content": content, "tool_calls": tool_calls}

    def _chat_response(self, prompt_ids: list[int], result: GenerateResult, reply: dict, with_logprobs: bool) -> dict:
        finish = "tool_calls" if reply.get("tool_calls") else result.finish_reason.value
        choice = {"index": 0, "message": reply, "finish_reason": finish, "token_ids": list(result.output_ids),
                  "logprobs": None}
        if with_logprobs:
            pieces = [self.tokenizer.decode([t]) for t in result.output_ids]
            choice["logprobs"] = {"content": [
                {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")), "top_logprobs": []}
                for piece, lp in zip(pieces, result.output_logprobs)]}
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(result.output_ids),
                 "total_tokens": len(prompt_ids) + len(result.output_ids)}
        return {"id": f"chatcmpl-{result.rid}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": usage, "prompt_token_ids": prompt_ids}

    async def _native(self, body: NativeBody) -> dict:
        if (body.input_ids is None) == (body.text is None):
            raise RequestError("input_ids", "give exactly one of input_ids and text")
        ids = body.input_ids if body.input_ids is not None else list(self.tokenizer.encode(body.text,
                                                                                          add_special_tokens=False))
        if not ids or len(ids) >= self.context_len:
            raise RequestError("input_ids", f"{len(ids)} prompt tokens do not fit the context {self.context_len}")
        params = body.sampling_params.to_sampling_params(self.context_len - len(ids))
        result = await self.client.generate(GenerateRequest(ids, params, return_logprob=body.return_logprob))
        reason: dict[str, Any] = {"type": result.finish_reason.value, "matched": result.matched_stop}
        if result.finish_reason is FinishReason.LENGTH:
            reason["length"] = len(result.output_ids)
        meta = {"id": result.rid, "finish_reason": reason, "prompt_tokens": len(ids),
                "completion_tokens": len(result.output_ids), "weight_version": str(result.weight_version)}
        if body.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(result.output_logprobs, result.output_ids)]
        return {"text": result.text, "output_ids": list(result.output_ids), "meta_info": meta}
