"""What our HTTP clients send and catch: the engines' key header, and what an aiohttp call raises when the server cannot be reached or stops answering, for every client of ours.

The engine's HTTP client and the remote reward client both catch this tuple: connect errors, dropped
connections, responses cut short and timeouts. The engine client then treats the engine as unavailable; the
reward client retries.
"""

from __future__ import annotations

import asyncio

import aiohttp

TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError,
                    asyncio.TimeoutError)


def bearer_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization: Bearer`` header that every route of a keyed server but /health requires."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
