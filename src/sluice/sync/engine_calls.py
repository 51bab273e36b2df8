"""The weight-sync calls to an engine's HTTP server: one attempt each, bounded by the push's deadline.

Unlike ``HttpEngineClient``, nothing here is retried: a repeated broadcast call would expect a collective the
trainer does not run again. Every call carries the engines' key (``Authorization: Bearer``): the weight routes
need the admin key on a server that has one.
"""

from __future__ import annotations

import asyncio
import ssl

import httpx

from sluice.net.transport import bearer_headers

SLUICE_ENGINE = "sluice"  # /get_server_info's "engine" field on our server; SGLang reports none


class EngineCallFailed(RuntimeError):
    """The engine answered with an error status or ``success: false``."""

    def __init__(self, url: str, path: str, status: int, message: str):
        super().__init__(f"{url}{path}: HTTP {status}: {message}")
        self.url = url
        self.message = message


class HttpClientPerLoop:
    """One pooled httpx client per event loop: a client is bound to the loop that made it, and a trainer may run
    each push under its own ``asyncio.run``. A new client's TLS context costs ~40-80 ms to build, so that is
    built once and shared by every client made here. ``api_key`` goes with every request."""

    def __init__(self, api_key: str | None = None):
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tls = ssl.create_default_context()
        self._headers = bearer_headers(api_key)

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = httpx.AsyncClient(verify=self._tls, headers=self._headers), loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = None


async def call_engine(http: httpx.AsyncClient, url: str, path: str, body: dict | None, timeout_s: float) -> dict:
    """POST ``body`` (GET when None) to ``url + path`` within ``timeout_s``; raises EngineCallFailed or httpx's
    errors (``httpx.TimeoutException`` past the time)."""
    timeout = httpx.Timeout(max(timeout_s, 1e-3))
    if body is None:
        response = await http.get(url + path, timeout=timeout)
    else:
        response = await http.post(url + path, json=body, timeout=timeout)
    try:
        payload = response.json()
    except ValueError:
        payload = {"message": response.text.strip()}
    if response.status_code >= 400 or (isinstance(payload, dict) and payload.get("success") is False):
        raise EngineCallFailed(url, path, response.status_code, _message(payload))
    return payload


async def is_sluice_engine(http: httpx.AsyncClient, url: str, timeout_s: float) -> bool:
    """Whether the server takes sluice's extensions (flattened buckets, checksums, staged versions)."""
    info = await call_engine(http, url, "/get_server_info", None, timeout_s)
    return info.get("engine") == SLUICE_ENGINE


def _message(payload) -> str:
    if not isinstance(payload, dict):
        return str(payload)
    error = payload.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(payload.get("message") or payload.get("detail") or payload)
