"""``EngineClient`` over SGLang's native HTTP API: talks to ``sluice serve`` or to a real SGLang server alike.

Connections are pooled and bounded. A request that never reached the server (connect error or timeout) is
retried with exponential backoff, whatever it was; one that may have reached it is retried only when repeating
it is harmless (abort, pause, resume, version reads, loading the same weights again), never a generate. A 503
with Retry-After (the server's waiting queue was full: the request was refused before it started) is retried
after the time the server asks for, generates included.

``api_key`` goes with every request as ``Authorization: Bearer <key>``; a server with an admin key needs that one
for pause, resume, abort and weight updates (it opens generation too).

The transport is aiohttp: a rollout keeps hundreds of generate requests open at once, and aiohttp's connection
pool hands out a connection in constant time. (httpx's pool scans every connection on each request: at 256
concurrent requests it cost ~25 ms of CPU per request on the demo machine, more than the engine's own work.)
The session belongs to the event loop that first used it; a call from another loop gets a fresh one.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from sluice.engine.clients.protocol import (EngineUnavailable, FinishReason, GenerateRequest, GenerateResult,
                                            NamedTensors, TopLogprobs)
from sluice.net.transport import TRANSPORT_ERRORS, bearer_headers
from sluice.types import SamplingParams


SLUICE_OWNER = "sluice"  # /v1/models' owned_by on sluice's server (SGLang's says "sglang")


@dataclass(frozen=True)
class HttpClientOptions:
    max_connections: int = 512  # concurrent requests to one engine; more wait for a free connection
    connect_timeout_s: float = 10.0
    keepalive_s: float = 30.0  # idle connections are dropped before the server's keep-alive (75 s for ours) ends
    generate_timeout_s: float | None = None  # a long generation is not an error: no read limit by default
    control_timeout_s: float = 1800.0  # loading weights from disk can take minutes on large models
    max_retries: int = 5
    backoff_s: float = 0.2  # first retry delay; doubles each time, with jitter
    max_backoff_s: float = 5.0


class EngineHTTPError(RuntimeError):
    """The engine answered with an error status (or ``success: false``)."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url}: HTTP {status}: {message}")
        self.status = status


class HttpEngineClient:
    def __init__(self, base_url: str, options: HttpClientOptions = HttpClientOptions(), api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.options = options
        self._headers = bearer_headers(api_key)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._last_version = 0  # for servers whose responses carry no weight version
        # see _read_context; read at the first generate, again at the next while a read fails
        self._context: tuple[int | None, int] | None = None
        self._background: set[asyncio.Task] = set()

    # ---- EngineClient ---------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        sampling = wire_sampling_params(request.sampling_params)
        payload = {"input_ids": list(request.input_ids), "sampling_params": sampling,
                   "return_logprob": request.return_logprob, "rid": request.rid}
        if request.top_logprobs_num:  # SGLang reports top logprobs only along with the token logprobs
            payload.update(return_logprob=True, top_logprobs_num=request.top_logprobs_num)
        if request.logprob_start_len != -1:
            payload["logprob_start_len"] = request.logprob_start_len
        if request.token_ids_logprob:
            payload["token_ids_logprob"] = list(request.token_ids_logprob)
        try:
            sampling["max_new_tokens"] = await self._fitting_max_new_tokens(request)
            body = await self._send("POST", "/generate", payload, False, self.options.generate_timeout_s)
        except asyncio.CancelledError:
            self._in_background(self.abort(request.rid))  # the engine should not decode for nobody
            raise
        except TRANSPORT_ERRORS as error:  # refused after the retries, or the connection dropped mid-request
            raise EngineUnavailable(f"{self.base_url}: {type(error).__name__}: {error}") from error
        result = parse_generate_response(body, request, self._last_version)
        self._last_version = max(self._last_version, result.weight_version)
        return result

    async def _fitting_max_new_tokens(self, request: GenerateRequest) -> int:
        """The contract ends a request at the context limit (finish reason length), as the in-process engine does;
        a server refuses a prompt + max_new_tokens past its context with 400 instead. So the limit is lowered to
        the room the prompt leaves, read from /v1/models once it answers. SGLang refuses a request that would fill its context
        exactly, sluice's server does not: one token less is asked of a server that is not sluice's."""
        context = self._context or await self._read_context()
        if context is None:  # not known yet (a server still starting, a refused key): read again next time
            return request.sampling_params.max_new_tokens
        self._context = context
        context_len, reserve = context
        wanted = request.sampling_params.max_new_tokens
        if context_len is None:
            return wanted
        room = context_len - reserve - len(request.input_ids)
        return min(wanted, room) if room >= 1 else wanted  # no room at all: the server's 400 names the prompt

    async def _read_context(self) -> tuple[int | None, int] | None:
        """(context length, tokens the server keeps free) from /v1/models; (None, 0) where it is not reported (a
        server without the route); None where the read failed (401, a 503 while the server starts, ...)."""
        try:
            body = await self._send("GET", "/v1/models", None, True, self.options.control_timeout_s)
        except EngineHTTPError as error:
            # 404/405: a server without the OpenAI routes, whose own errors will tell; any other failure (a
            # refused key, a server still starting) may pass, so it is not kept
            return (None, 0) if error.status in (404, 405) else None
        models = body.get("data") if isinstance(body, dict) else None
        card = models[0] if isinstance(models, list) and models and isinstance(models[0], dict) else {}
        context_len = card.get("max_model_len")
        if not isinstance(context_len, int):
            return None, 0
        return context_len, 0 if card.get("owned_by") == SLUICE_OWNER else 1

    async def update_weights(self, weights: NamedTensors | str, version: int) -> None:
        if isinstance(weights, Mapping):
            raise TypeError("HttpEngineClient cannot send named tensors over HTTP: use the distributed path "
                            "(/init_weights_update_group + /update_weights_from_distributed, see "
                            "sluice.weights.process_group) or save a checkpoint and pass its directory")
        body = await self._post("/update_weights_from_disk", {"model_path": str(weights), "weight_version": str(version)},
                                idempotent=True)
        if body.get("success") is False:
            raise EngineHTTPError(self.base_url, 400, body.get("message", "weight update failed"))
        self._last_version = version

    async def abort(self, rid: str | None = None) -> None:
        await self._post("/abort_request", {"abort_all": True} if rid is None else {"rid": rid}, idempotent=True)

    async def pause(self) -> None:
        """Hold generation; running requests keep their state and continue on resume (SGLang's in_place mode)."""
        await self._post("/pause_generation", {"mode": "in_place"}, idempotent=True)

    async def resume(self) -> None:
        await self._post("/continue_generation", {}, idempotent=True)

    async def weight_version(self) -> int:
        body = await self._send("GET", "/get_weight_version", None, True, self.options.control_timeout_s)
        return parse_weight_version(body.get("weight_version"), self._last_version)

    # ---- extras -----------------------------------------------------------------------------------------
    async def health(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.options.connect_timeout_s)
        try:
            async with self._http().get(self.base_url + "/health", timeout=timeout) as response:
                await response.read()
                return response.status == 200
        except TRANSPORT_ERRORS:
            return False

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll /health until the server answers (it may still be loading the model)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await self.health():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{self.base_url} did not become healthy within {timeout_s:.0f} s")
            await asyncio.sleep(0.2)

    async def aclose(self) -> None:
        if self._session is not None and self._session_loop is asyncio.get_running_loop():
            await self._session.close()
        elif self._session is not None:
            self._session.detach()  # its loop is gone or elsewhere: its connections cannot be closed from here
        self._session = None

    # ---- transport ----------------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop or self._session.closed:
            if self._session is not None:
                self._session.detach()
            connector = aiohttp.TCPConnector(limit=self.options.max_connections, limit_per_host=0,
                                             keepalive_timeout=self.options.keepalive_s)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
            self._session_loop = loop
        return self._session

    async def _post(self, path: str, payload: dict, idempotent: bool) -> dict:
        """A control call, under the control timeout."""
        return await self._send("POST", path, payload, idempotent, self.options.control_timeout_s)

    async def _send(self, method: str, path: str, payload: dict | None, idempotent: bool,
                    read_timeout_s: float | None) -> dict:
        """One call, retried as the module docstring says; ``read_timeout_s`` None: no read limit."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout_s, sock_read=read_timeout_s)
        url = self.base_url + path
        for attempt in range(self.options.max_retries + 1):
            try:
                async with self._http().request(method, url, json=payload, timeout=timeout) as response:
                    raw = await response.read()
                    wait_s = _retry_after(response)
                    if wait_s is None or attempt == self.options.max_retries:
                        return _json_or_raise(url, response.status, raw)
                await asyncio.sleep(min(wait_s, self.options.max_backoff_s) * random.uniform(1.0, 1.5))
                continue
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                failure, retry = error, True  # the request never reached the server
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError,
                    aiohttp.ClientResponseError) as error:  # the last: a malformed or cut response head
                failure, retry = error, idempotent  # it may have reached the server: repeat only what is harmless
            if not retry or attempt == self.options.max_retries:
                raise failure
            delay = min(self.options.max_backoff_s, self.options.backoff_s * 2**attempt)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def _in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(lambda t: (self._background.discard(t), t.cancelled() or t.exception()))


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    """Seconds a 503 with Retry-After asks to wait before trying again; None for any other answer."""
    if response.status != 503 or "Retry-After" not in response.headers:
        return None
    try:
        return max(float(response.headers["Retry-After"]), 0.0)
    except ValueError:
        return None


def _json_or_raise(url: str, status: int, raw: bytes) -> dict:
    if status >= 400:
        raise EngineHTTPError(url, status, _error_message(raw))
    try:
        return json.loads(raw)
    except ValueError:
        return {"message": raw.decode(errors="replace")}


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body)
    return str(body)


def wire_sampling_params(params: SamplingParams) -> dict:
    """Our SamplingParams as SGLang's ``sampling_params`` (the field names already match, except the seed)."""
    wire = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "min_p": params.min_p,
            "max_new_tokens": params.max_new_tokens, "stop": list(params.stop),
            "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
            "skip_special_tokens": params.skip_special_tokens}
    if params.seed is not None:
        wire["sampling_seed"] = params.seed
    return wire


def parse_weight_version(value, fallback: int) -> int:
    """SGLang reports versions as strings, "default" before any update; ours are integers."""
    if value is None or value == "default":
        return fallback
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"weight_version {value!r} from the engine is not an integer") from None


def parse_generate_response(body: dict, request: GenerateRequest, fallback_version: int) -> GenerateResult:
    """A native /generate response -> GenerateResult; raises ValueError naming a missing or odd field."""
    meta = body.get("meta_info")
    if not isinstance(meta, dict):
        raise ValueError(f"/generate response without meta_info: {str(body)[:200]}")
    triples = meta.get("output_token_logprobs") or []
    output_ids = body.get("output_ids")
    if output_ids is None:  # older SGLang: the ids ride in the logprob triples
        output_ids = [int(t[1]) for t in triples]
    finish = meta.get("finish_reason") or {"type": "abort"}
    try:
        reason = FinishReason(finish.get("type"))
    except ValueError:
        raise ValueError(f"meta_info.finish_reason.type {finish.get('type')!r} is not stop, length or abort") from None
    return GenerateResult(
        rid=str(meta.get("id", request.rid)),
        output_ids=list(output_ids),
        output_logprobs=[float(t[0]) for t in triples] if request.return_logprob else [],
        finish_reason=reason,
        weight_version=parse_weight_version(meta.get("weight_version"), fallback_version),
        prompt_tokens=int(meta.get("prompt_tokens", len(request.input_ids))),
        text=body.get("text", ""),
        matched_stop=finish.get("matched"),
        cached_tokens=int(meta.get("cached_tokens", 0)),
        weight_versions=_expand_version_runs(meta.get("weight_version_runs"), len(output_ids)),
        output_top_logprobs=_parse_top_logprobs(meta, request.top_logprobs_num, len(output_ids)),
        input_logprobs=_parse_input_logprobs(meta) if request.return_logprob else [],
        input_top_logprobs=_parse_input_top_logprobs(meta, request.top_logprobs_num) if request.return_logprob else [],
        output_token_ids_logprobs=_parse_token_ids_logprobs(meta, "output_token_ids_logprobs", request),
        input_token_ids_logprobs=_parse_token_ids_logprobs(meta, "input_token_ids_logprobs", request),
    )


def _parse_top_logprobs(meta: dict, count: int, num_tokens: int) -> list[TopLogprobs]:
    """SGLang's ``output_top_logprobs`` (per output token, ``[[logprob, token_id, text], ...]``) as records."""
    if not count:
        return []
    positions = meta.get("output_top_logprobs")
    if not isinstance(positions, list) or len(positions) != num_tokens:
        raise ValueError(f"meta_info.output_top_logprobs should list {num_tokens} positions (top_logprobs_num "
                         f"{count} was asked for); got {str(positions)[:200]}")
    try:
        return [TopLogprobs([int(t[1]) for t in triples], [float(t[0]) for t in triples]) for triples in positions]
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"meta_info.output_top_logprobs {str(positions)[:200]} is not a list of "
                         "[logprob, token_id, text] triples per position") from None


def _parse_input_logprobs(meta: dict) -> list[float | None]:
    """SGLang's ``input_token_logprobs`` (``[[logprob or None, token_id, text], ...]``) as logprobs; [] if absent."""
    triples = meta.get("input_token_logprobs") or []
    try:
        return [None if t[0] is None else float(t[0]) for t in triples]
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"meta_info.input_token_logprobs {str(triples)[:200]} is not a list of "
                         "[logprob, token_id, text] triples") from None


def _parse_input_top_logprobs(meta: dict, count: int) -> list[TopLogprobs | None]:
    """SGLang's ``input_top_logprobs``: per prompt position its candidates' triples, or None (the first)."""
    if not count:
        return []
    positions = meta.get("input_top_logprobs") or []
    try:
        return [None if triples is None else TopLogprobs([int(t[1]) for t in triples], [float(t[0]) for t in triples])
                for triples in positions]
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"meta_info.input_top_logprobs {str(positions)[:200]} is not a list of "
                         "[logprob, token_id, text] triples (or None) per position") from None


def _parse_token_ids_logprobs(meta: dict, key: str, request: GenerateRequest) -> list:
    """SGLang's ``output_token_ids_logprobs``/``input_token_ids_logprobs``: per position the named ids' triples
    (or None, the first prompt position) as their logprobs; [] when the request named none."""
    if not (request.token_ids_logprob and request.return_logprob):
        return []
    positions = meta.get(key) or []
    try:
        return [None if triples is None else [float(t[0]) for t in triples] for triples in positions]
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"meta_info.{key} {str(positions)[:200]} is not a list of [logprob, token_id, text] "
                         "triples (or None) per position") from None


def _expand_version_runs(runs, num_tokens: int) -> list[int]:
    """sluice's ``weight_version_runs`` back to one version per output token; [] when absent or not matching."""
    if not isinstance(runs, list):
        return []
    try:
        versions = [int(version) for version, count in runs for _ in range(int(count))]
    except (TypeError, ValueError):
        raise ValueError(f"meta_info.weight_version_runs {str(runs)[:100]} is not a list of [version, count]") from None
    return versions if len(versions) == num_tokens else []
