"""What an aiohttp call raises when the server cannot be reached or stops answering, for every client of ours.

The engine's HTTP client and the remote reward client both catch this tuple: connect errors, dropped
connections, responses cut short and timeouts. The engine client then treats the engine as unavailable; the
reward client retries.
"""

from __future__ import annotations

import asyncio

import aiohttp

TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError,
                    asyncio.TimeoutError)
