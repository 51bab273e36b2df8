"""Listening sockets for our HTTP servers (the engine's ``sluice serve`` and the rollout's agent gateway).

A server binds its socket here before anything slow starts, so a busy port fails at once, and then runs uvicorn
on that socket in a thread of its own or in the foreground.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from sluice.errors import ConfigError


def bind_listener(host: str, port: int, owner: str) -> socket.socket:
    """A listening TCP socket; connections made before the server loop starts wait in its backlog. ``owner`` names
    what asked for it in the error (the flag that set the port, or the server it is for)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it, a response
    # written in two parts (headers, body) waits out the client's delayed ACK, 40 ms per keep-alive call.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"{owner}: cannot listen on {host}:{port}: {error.strerror}") from None
    listener.listen(2048)
    return listener


def start_in_thread(server: uvicorn.Server, thread: threading.Thread, what: str, timeout_s: float) -> None:
    """Start ``thread`` (which runs ``server``) and wait until it accepts connections; raise if it dies first."""
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)
