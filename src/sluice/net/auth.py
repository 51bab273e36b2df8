"""API keys of our HTTP servers (the engine's and the agent gateway), checked as SGLang and the OpenAI client
send them: ``Authorization: Bearer <key>``.

Each route has an access level:
- ``OPEN``: no key (``/health``, so load balancers and the router's health checks need none);
- ``USER``: the API key, or the admin key; open when the server has no API key;
- ``ADMIN``: the admin key when the server has one (the API key then gets 403), else the API key; open when the
  server has neither.

Keys are compared in constant time (``hmac.compare_digest``) and appear in no message, log or repr.
``check_exposure`` refuses to listen beyond loopback without a key.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import socket
from dataclasses import dataclass, field

from fastapi import Depends, Request

from sluice.errors import ConfigError
from sluice.net.http_errors import RequestError

BEARER = "bearer"


class Access(enum.Enum):
    OPEN = "open"
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True)
class ApiKeys:
    api_key: str | None = field(default=None, repr=False)  # USER routes (and ADMIN ones without an admin key)
    admin_api_key: str | None = field(default=None, repr=False)  # ADMIN routes; accepted on USER routes too

    @property
    def any(self) -> bool:
        return bool(self.api_key or self.admin_api_key)

    @property
    def client_key(self) -> str | None:
        """The key that opens every route: what a server's own clients (rollout, weight sync) send."""
        return self.admin_api_key or self.api_key

    def check(self, authorization: str | None, access: Access) -> None:
        """Raise RequestError 401 (no or wrong key) or 403 (the API key on an admin route) unless allowed."""
        if access is Access.OPEN:
            return
        token = bearer_token(authorization)
        if access is Access.USER:
            if not self.api_key or _matches(token, self.api_key) or _matches(token, self.admin_api_key):
                return
            raise _unauthorized(token, "this server needs an API key")
        required = self.admin_api_key or self.api_key
        if not required or _matches(token, required):
            return
        if self.admin_api_key and _matches(token, self.api_key):
            raise RequestError("", "this route needs the admin API key; the key sent opens generation only",
                               status=403)
        raise _unauthorized(token, "this route needs the admin API key" if self.admin_api_key
                            else "this server needs an API key")

    def dependency(self, access: Access) -> list:
        """A route's or router's ``dependencies=``: the check, before the body is read."""
        async def require_key(request: Request) -> None:
            self.check(request.headers.get("authorization"), access)

        return [Depends(require_key)]


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header; None for any other header or none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != BEARER:
        return None
    return token.strip() or None


def _matches(token: str | None, key: str | None) -> bool:
    # compare_digest takes as long for a wrong key of the right length whatever its content; bytes, as it refuses
    # non-ASCII str
    return token is not None and bool(key) and hmac.compare_digest(token.encode(), key.encode())


def _unauthorized(token: str | None, message: str) -> RequestError:
    detail = "send 'Authorization: Bearer KEY'" if token is None else "the key sent is not valid"
    return RequestError("", f"{message}: {detail}", status=401, headers={"WWW-Authenticate": "Bearer"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, keys: ApiKeys, allow_unauthenticated: bool, what: str, key_flag: str,
                   allow_flag: str | None = "--allow-unauthenticated") -> None:
    """Refuse to listen on ``host`` beyond loopback without an API key (unless explicitly allowed)."""
    if is_loopback(host) or keys.api_key or allow_unauthenticated:
        return
    escape = f", or pass {allow_flag} if a proxy of your own in front of it checks every caller" if allow_flag else ""
    raise ConfigError(f"{what} would listen on {host} without an API key: anyone who can reach that address could "
                      f"generate, pause the engine or replace its weights. Set {key_flag} KEY (clients then send "
                      f"'Authorization: Bearer KEY'){escape}; or listen on 127.0.0.1")
