"""SGLang's control endpoints: health, info, load, cache, abort, pause and memory; weight updates in weight_api.py.

Calls that wait for the engine (memory moves) run in worker threads, so the event loop keeps answering /health and
streaming while they block.

Access (sluice/net/auth.py): /health is open; the info routes need the API key; the scheduling routes (flush,
abort, pause, continue, memory) and every weight route need the admin key when the server has one.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

import sluice
from sluice.engine.clients.protocol import GenerateRequest
from sluice.engine.server.context import ServerContext
from sluice.engine.server.native_schema import AbortBody, MemoryBody, PauseBody
from sluice.engine.server.weight_api import weight_router
from sluice.net.auth import Access
from sluice.net.http_errors import RequestError, read_body
from sluice.types import SamplingParams

HEALTH_GENERATE_TIMEOUT_S = 20.0


def control_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health():
        return {}

    info = APIRouter(dependencies=ctx.keys.dependency(Access.USER))
    _add_info_routes(info, ctx)
    control = APIRouter(dependencies=ctx.keys.dependency(Access.ADMIN))
    _add_scheduling_routes(control, ctx)
    control.include_router(weight_router(ctx))
    router.include_router(info)
    router.include_router(control)
    return router


def _add_info_routes(router: APIRouter, ctx: ServerContext) -> None:
    @router.get("/health_generate")
    async def health_generate():
        """A one-token generation: proves the engine loop runs, not just the HTTP server."""
        probe = GenerateRequest([_probe_token(ctx)], SamplingParams(temperature=0.0, max_new_tokens=1),
                                return_logprob=False)
        try:
            await asyncio.wait_for(ctx.async_engine.generate(probe), HEALTH_GENERATE_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure means unhealthy
            return JSONResponse({"error": {"message": f"generation failed: {error!r}"}}, status_code=503)
        return {}

    @router.get("/get_model_info")
    @router.get("/model_info")  # the newer SGLang name, which sglang-router asks for first
    async def model_info():
        config = ctx.engine.model_config
        return {"model_path": ctx.model_path, "tokenizer_path": ctx.model_path, "is_generation": True,
                "served_model_name": ctx.served_model_name, "model_type": getattr(config, "model_type", None),
                "architectures": getattr(config, "architectures", None), "weight_version": str(ctx.engine.weight_version),
                "has_image_understanding": False, "has_audio_understanding": False,
                "preferred_sampling_params": None}

    @router.get("/get_server_info")
    @router.get("/server_info")
    async def server_info():
        config = ctx.engine_config
        return {"model_path": ctx.model_path, "tokenizer_path": ctx.model_path,
                "served_model_name": ctx.served_model_name, "host": ctx.host, "port": ctx.port,
                "version": sluice.__version__, "engine": "sluice",
                "context_length": ctx.context_len, "tp_size": 1, "dp_size": 1,
                "max_running_requests": config.max_running_requests, "mem_fraction_static": config.mem_fraction_static,
                "dtype": config.dtype, "device": config.device, "weight_version": str(ctx.engine.weight_version),
                "internal_states": [{"load": ctx.engine.load()}]}

    @router.get("/get_load")
    async def load():
        """Per data-parallel rank (one here); ``load`` is what sglang-router's power-of-two policy compares."""
        stats = ctx.engine.load()
        return [{"dp_rank": 0, "load": stats["num_running"] + stats["num_waiting"], "num_reqs": stats["num_running"],
                 "num_waiting_reqs": stats["num_waiting"], "num_tokens": stats["num_tokens"]}]

    @router.get("/get_weight_version")
    async def weight_version():
        return {"weight_version": str(ctx.engine.weight_version)}


def _add_scheduling_routes(router: APIRouter, ctx: ServerContext) -> None:
    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        if ctx.engine.flush_cache():
            return PlainTextResponse("Cache flushed.\n")
        return PlainTextResponse("Cache not flushed: requests are running; retry when idle.\n", status_code=400)

    @router.post("/abort_request")
    async def abort_request(request: Request):
        body = await read_body(request, AbortBody)
        if not body.abort_all and not body.rid:
            raise RequestError("rid", "give the request id to abort, or abort_all: true")
        ctx.engine.abort(None if body.abort_all else body.rid)
        return {}

    @router.post("/pause_generation")
    async def pause_generation(request: Request):
        mode = (await read_body(request, PauseBody, optional=True)).mode
        if mode == "abort":  # abort first: aborted requests are answered even while paused
            ctx.engine.abort(None)
        ctx.engine.pause()
        return {"message": f"Generation paused (mode {mode})."}

    @router.post("/continue_generation")
    async def continue_generation():
        ctx.engine.resume()
        return {"message": "Generation continued."}

    @router.post("/release_memory_occupation")
    async def release_memory(request: Request):
        await read_body(request, MemoryBody, optional=True)
        await asyncio.to_thread(ctx.engine.release_memory)
        return {}

    @router.post("/resume_memory_occupation")
    async def resume_memory(request: Request):
        await read_body(request, MemoryBody, optional=True)
        await asyncio.to_thread(ctx.engine.resume_memory)
        return {}


def _probe_token(ctx: ServerContext) -> int:
    token = getattr(ctx.tokenizer, "eos_token_id", None)
    return token if token is not None and 0 <= token < ctx.vocab_size else 0
