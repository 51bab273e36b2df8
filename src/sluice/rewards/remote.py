"""``--rm-type remote_rm``: a reward computed by an HTTP service (a judge model, a sandbox) at ``--rm-url``.

Each sample is one ``POST`` of JSON ``{"prompt", "response", "label", "metadata"}`` (slime's body plus the
metadata); the answer is a JSON number, or an object whose numeric fields become a dict reward
(``--reward-key`` picks the trained one). Per request: a timeout (``--rm-timeout``); connection errors,
timeouts and 429/5xx answers are retried with exponential backoff (``--rm-max-retries``); other 4xx answers are
errors at once (a bad request does not improve by repeating it). At most ``--rm-max-connections`` requests are
in flight; the rest wait for a connection without that wait counting against their timeout.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sluice.net.transport import TRANSPORT_ERRORS
from sluice.rewards.contract import RewardValue
from sluice.types import Sample

RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RemoteRewardError(RuntimeError):
    """The reward service refused the request or never answered; the message names the URL."""


def request_body(sample: Sample) -> dict[str, Any]:
    """What is posted for ``sample``.

    >>> request_body(Sample(prompt="2+2=", response="4", label="4", metadata={"task": "add"}))
    {'prompt': '2+2=', 'response': '4', 'label': '4', 'metadata': {'task': 'add'}}
    """
    return {"prompt": sample.prompt, "response": sample.response, "label": sample.label,
            "metadata": sample.metadata}


def parse_reward(payload: Any, url: str) -> RewardValue:
    """A JSON number, or the numeric fields of a JSON object.

    >>> parse_reward(1, "u"), parse_reward({"score": 0.5, "acc": True, "pred": "4"}, "u")
    (1.0, {'score': 0.5, 'acc': 1.0})
    """
    if isinstance(payload, (int, float)) and not isinstance(payload, bool):
        return float(payload)
    if isinstance(payload, dict):
        numeric = {str(k): float(v) for k, v in payload.items() if isinstance(v, (int, float))}
        if numeric:
            return numeric
    raise RemoteRewardError(f"{url} answered {json.dumps(payload)[:200]}: expected a number or an object "
                            "with numeric fields")


@dataclass
class RemoteReward:
    """An async ``RewardFn`` posting to ``url``; one connection pool per event loop it is used from.

    >>> reward = RemoteReward("http://127.0.0.1:8000/score", timeout_s=5.0, max_retries=2)
    >>> reward.backoff_s(0), reward.backoff_s(2)
    (0.25, 1.0)
    """

    url: str
    timeout_s: float = 30.0
    max_retries: int = 3
    max_connections: int = 64
    first_backoff_s: float = 0.25
    # Event loop -> its session. A session belongs to the loop that opened its connections; a run that starts a
    # loop per rollout step gets a fresh pool per step.
    _clients: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def backoff_s(self, attempt: int) -> float:
        return self.first_backoff_s * 2**attempt

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        for key, (owner, session) in list(self._clients.items()):
            if owner.is_closed():
                session.detach()  # its connections died with their loop
                del self._clients[key]
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            # The timeout bounds connecting and each read; waiting for a free connection is not a failure.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_connections),
                                            timeout=timeout)
            entry = self._clients[id(loop)] = (loop, session)
        return entry[1]

    async def __call__(self, sample: Sample) -> RewardValue:
        client = self._client()
        body = json.dumps(request_body(sample), default=str)
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s(attempt - 1))
            try:
                async with client.post(self.url, data=body, headers={"content-type": "application/json"}) as response:
                    status, raw = response.status, await response.read()
            except TRANSPORT_ERRORS as error:  # refused, reset, cut short, timed out
                last_problem = f"{type(error).__name__}: {error}"
                continue
            text = raw.decode(errors="replace")
            if status in RETRIED_STATUSES:
                last_problem = f"HTTP {status}"
                continue
            if status >= 400:
                raise RemoteRewardError(f"{self.url} answered HTTP {status}: {text[:200]}")
            try:
                payload = json.loads(raw)
            except ValueError:
                raise RemoteRewardError(f"{self.url} answered non-JSON: {text[:200]!r}") from None
            return parse_reward(payload, self.url)
        raise RemoteRewardError(f"{self.url}: no usable answer after {self.max_retries + 1} attempts "
                                f"(last: {last_problem})")

    async def aclose(self) -> None:
        """Close the pool of the running loop (others are dropped with their loops)."""
        entry = self._clients.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            await entry[1].close()
