"""A bound on the size of request bodies, for our HTTP servers (the engine's and the agent gateway).

An ASGI middleware: a declared ``Content-Length`` past the bound gets 413 before any byte of the body is read;
a body sent without one (chunked) is counted as it arrives and refused at the first byte past the bound, so no
route ever holds more than ``max_bytes`` of it in memory.
"""

from __future__ import annotations

from sluice.net.http_errors import RequestError, error_response

MIB = 2**20


class BodyTooLarge(RequestError):
    def __init__(self, max_bytes: int, flag: str):
        super().__init__("", f"the request body is larger than {max_bytes / MIB:g} MiB ({flag})", status=413)


class BodyLimit:
    """``app.add_middleware(BodyLimit, max_bytes=..., flag=...)``; ``flag`` names the setting in the 413."""

    def __init__(self, app, max_bytes: int, flag: str):
        self.app, self.max_bytes, self.flag = app, max_bytes, flag

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            refused = BodyTooLarge(self.max_bytes, self.flag)
            return await error_response(413, str(refused))(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # raised inside the route's body read: its error handler answers
                    raise BodyTooLarge(self.max_bytes, self.flag)
            return message

        return await self.app(scope, counted_receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
