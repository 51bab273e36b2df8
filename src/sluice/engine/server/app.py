"""`sluice serve`: our engine behind SGLang's HTTP API, so SGLang clients, slime and sglang-router can use it.

One process holds one LocalEngine (its worker thread does the compute) and one asyncio event loop (uvicorn)
that answers HTTP. Routes live in native_api.py (/generate), control_api.py (health, info, abort, pause, memory,
weight updates) and openai_api.py (/v1/*). Bad requests get a 400 naming the field (sluice/net/http_errors.py).
The command line (``sluice serve`` flags into ``ServeArgs``) is parsed in sluice/cli.py.

Who may call what (sluice/net/auth.py): with --api-key every route but /health needs the key; with
--admin-api-key the control and weight routes need that one. Without a key the server listens on loopback only,
unless --allow-unauthenticated. Bodies are bounded (413), so are the generations per request and the prompt
length (400) and the waiting queue (503 with Retry-After); /update_weights_from_disk loads only from the model's
parent directory and --sglang-weight-load-dirs.

``BackgroundServer`` runs the same app in a thread of the calling process: a local run with an HTTP engine, tests.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI

from sluice.engine.server.context import ServerContext, api_keys
from sluice.engine.server.control_api import control_router
from sluice.engine.server.native_api import native_generate_router
from sluice.engine.server.openai_api import openai_router
from sluice.engine.settings import EngineConfig
from sluice.net.auth import check_exposure
from sluice.net.body_limit import MIB, BodyLimit
from sluice.net.http_errors import install_error_handlers
from sluice.net.listener import bind_listener, start_in_thread

DEFAULT_PORT = 30000  # SGLang's


@dataclass
class ServeArgs:
    model_path: str  # HF checkpoint directory
    host: str = "127.0.0.1"  # loopback by default; any other address needs an API key (engine.api_key)
    port: int = DEFAULT_PORT  # 0: any free port (printed at start)
    served_model_name: str | None = None  # the name /v1/models reports; default: model_path
    log_level: str = "warning"
    engine: EngineConfig = field(default_factory=EngineConfig)  # the engine's settings, keys and request limits
    allow_unauthenticated: bool = False  # listen beyond loopback without a key (a proxy in front checks callers)


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="sluice engine", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=int(ctx.engine_config.max_request_body_mb * MIB),
                       flag="--sglang-max-request-body-mb")
    app.include_router(native_generate_router(ctx))
    app.include_router(control_router(ctx))
    app.include_router(openai_router(ctx))
    return app


def check_server_exposure(host: str, engine: EngineConfig, allow_unauthenticated: bool) -> None:
    check_exposure(host, api_keys(engine), allow_unauthenticated, "the engine server",
                   "--api-key (sluice serve) or --sglang-api-key")


def run_server(args: ServeArgs) -> int:
    """Load the engine, serve until interrupted, shut the engine down."""
    from sluice.engine.local_engine import LocalEngine

    check_server_exposure(args.host, args.engine, args.allow_unauthenticated)
    # first, so a busy port fails before the model loads
    listener = bind_listener(args.host, args.port, f"--host {args.host} --port {args.port}")
    engine = LocalEngine(args.model_path, args.engine)
    port = listener.getsockname()[1]
    ctx = ServerContext(engine, args.model_path, args.served_model_name or args.model_path, args.engine,
                        host=args.host, port=port)
    server = uvicorn.Server(uvicorn_config(build_app(ctx), args.log_level))
    print(f"sluice serve: {ctx.served_model_name} at http://{args.host}:{port}", flush=True)
    print(f"sluice serve: {_access_summary(ctx)}", flush=True)
    try:
        server.run(sockets=[listener])
    finally:
        engine.shutdown()
    return 0


def _access_summary(ctx: ServerContext) -> str:
    keys = ctx.keys
    generation = "API key required" if keys.api_key else "open to anyone who reaches the address"
    control = "admin key required" if keys.admin_api_key else ("API key required" if keys.api_key else "open")
    return f"generation {generation}; control and weight routes {control}"


# Idle keep-alive connections stay open this long. Clients keep theirs for less (HttpClientOptions), so a client
# never sends on a connection the server is closing at that moment: with uvicorn's default of 5 s, equal to
# httpx's, a request now and then met a closed socket (a ReadError on a healthy engine).
KEEP_ALIVE_S = 75


def uvicorn_config(app, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S)


class BackgroundServer:
    """Serve ``ctx`` from a daemon thread of this process; ``url`` is valid once ``start`` returns."""

    def __init__(self, ctx: ServerContext, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 allow_unauthenticated: bool = False):
        check_server_exposure(host, ctx.engine_config, allow_unauthenticated)
        self.listener = bind_listener(host, port, "the engine server")
        ctx.host, ctx.port = host, self.listener.getsockname()[1]  # the real port, for /get_server_info
        self.url = f"http://{host}:{ctx.port}"
        self.server = uvicorn.Server(uvicorn_config(build_app(ctx), log_level))
        self.thread = threading.Thread(target=self._run, name="sluice-http", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.listener]))

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        start_in_thread(self.server, self.thread, f"the HTTP server at {self.url}", timeout_s)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
