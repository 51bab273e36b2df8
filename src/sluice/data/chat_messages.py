"""The shape chat templates expect of a conversation, checked row by row."""

from __future__ import annotations

from typing import Any

from sluice.data.rows import DataError


def check_messages(where: str, key: str, messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages must be dicts with a string role and string content; ``where`` and ``key`` name the row."""
    if not messages:
        raise DataError(f"{where}: {key!r} is an empty list of chat messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise DataError(f"{where}: {key!r}[{i}] must be a dict with 'role' and 'content', got {kind}")
        for field_name in ("role", "content"):
            if not isinstance(message.get(field_name), str):
                raise DataError(
                    f"{where}: {key!r}[{i}] needs a string {field_name!r}, got {message.get(field_name)!r}"
                )
    return messages
