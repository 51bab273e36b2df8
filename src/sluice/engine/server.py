"""`sluice serve`: our engine behind SGLang's HTTP API, so SGLang clients, slime and sglang-router can use it.

One process holds one LocalEngine (its worker thread does the compute) and one asyncio event loop (uvicorn)
that answers HTTP. Routes live in native_api.py (/generate), control_api.py (health, info, abort, pause, memory,
weight updates) and openai_api.py (/v1/*). Bad requests get a 400 naming the field (http_errors.py).

``BackgroundServer`` runs the same app in a thread of the calling process: a local run with an HTTP engine, tests.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI

from sluice.config import ConfigError, EngineConfig, parse_config, validate
from sluice.config.flags import ENGINE_PREFIX, ENGINE_SECTION, flag_specs
from sluice.engine.control_api import control_router
from sluice.engine.http_errors import install_error_handlers
from sluice.engine.native_api import native_generate_router
from sluice.engine.openai_api import openai_router
from sluice.engine.server_context import ServerContext

DEFAULT_PORT = 30000  # SGLang's


@dataclass
class ServeArgs:
    model_path: str  # HF checkpoint directory
    host: str = "127.0.0.1"  # loopback by default: the API has no authentication
    port: int = DEFAULT_PORT  # 0: any free port (printed at start)
    served_model_name: str | None = None  # the name /v1/models reports; default: model_path
    log_level: str = "warning"
    engine: EngineConfig = field(default_factory=EngineConfig)


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="sluice engine", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(native_generate_router(ctx))
    app.include_router(control_router(ctx))
    app.include_router(openai_router(ctx))
    return app


def run_server(args: ServeArgs) -> int:
    """Load the engine, serve until interrupted, shut the engine down."""
    from sluice.engine.local_engine import LocalEngine

    listener = bind_listener(args.host, args.port)  # first, so a busy port fails before the model loads
    engine = LocalEngine(args.model_path, args.engine)
    port = listener.getsockname()[1]
    ctx = ServerContext(engine, args.model_path, args.served_model_name or args.model_path, args.engine,
                        host=args.host, port=port)
    server = uvicorn.Server(uvicorn_config(build_app(ctx), args.log_level))
    print(f"sluice serve: {ctx.served_model_name} at http://{args.host}:{port}", flush=True)
    try:
        server.run(sockets=[listener])
    finally:
        engine.shutdown()
    return 0


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket; connections made before the server loop starts wait in its backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it, a response
    # written in two parts (headers, body) waits out the client's delayed ACK, 40 ms per keep-alive call.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: {error.strerror}") from None
    listener.listen(2048)
    return listener


# Idle keep-alive connections stay open this long. Clients keep theirs for less (HttpClientOptions), so a client
# never sends on a connection the server is closing at that moment: with uvicorn's default of 5 s, equal to
# httpx's, a request now and then met a closed socket (a ReadError on a healthy engine).
KEEP_ALIVE_S = 75


def uvicorn_config(app, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S)


class BackgroundServer:
    """Serve ``ctx`` from a daemon thread of this process; ``url`` is valid once ``start`` returns."""

    def __init__(self, ctx: ServerContext, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.listener = bind_listener(host, port)
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


def start_in_thread(server: uvicorn.Server, thread: threading.Thread, what: str, timeout_s: float) -> None:
    """Start ``thread`` (which runs ``server``) and wait until it accepts connections; raise if it dies first."""
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)


# ---- command line -----------------------------------------------------------------------------------------
class _ServeParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _engine_flags_epilog() -> str:
    lines = ["engine flags (SGLang server names):"]
    for spec in flag_specs():
        if spec.section == ENGINE_SECTION:
            lines.append(f"  {spec.flag}  {spec.help} (default: {spec.default})")
    lines.append("  --config FILE  YAML file of flags; only its engine keys are used here")
    return "\n".join(lines)


def parse_serve_args(argv: list[str]) -> ServeArgs:
    """Serve flags plus the --sglang-* engine flags of the config tree; anything else is an error."""
    parser = _ServeParser(prog="sluice serve", allow_abbrev=False, epilog=_engine_flags_epilog(),
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Serve a model over SGLang's native HTTP API and an OpenAI-compatible API.")
    parser.add_argument("--model", "--model-path", "--hf-checkpoint", dest="model_path", required=True,
                        help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: loopback only).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port; 0 picks a free one.")
    parser.add_argument("--served-model-name", default=None, help="Model name in /v1 responses (default: --model).")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args, rest = parser.parse_known_args(argv)
    foreign = [a for a in rest if _is_flag(a) and a.split("=", 1)[0] != "--config"
               and not a.startswith("--" + ENGINE_PREFIX)]
    if foreign:
        raise ConfigError(f"unknown flag {foreign[0]}: sluice serve takes --model, --host, --port, "
                          f"--served-model-name, --log-level and engine flags (--{ENGINE_PREFIX}*)")
    config = parse_config(rest)
    validate(config, for_training=False)
    return ServeArgs(args.model_path, args.host, args.port, args.served_model_name, args.log_level, config.engine)


def _is_flag(token: str) -> bool:
    """``--x`` is a flag; ``-1`` or ``-0.5`` is a (negative) value of the flag before it."""
    if not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False
