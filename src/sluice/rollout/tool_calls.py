"""Tool calls in model output, in Qwen's (Hermes) format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Qwen2/2.5/3 and most open tool-calling templates use this markup. A malformed call (bad JSON, no name) is
returned with its ``error`` set, so the rollout can tell the model what was wrong instead of ignoring it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str  # "" when the call could not be parsed
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why the call is malformed; None for a well-formed call


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every complete ``<tool_call>...</tool_call>`` block of ``text``, in order.

    >>> parse_tool_calls('sure <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    [ToolCall(name='add', arguments={'a': 1, 'b': 2}, error=None)]
    >>> parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\\\"a\\\\": 1}"}</tool_call>')[0].arguments
    {'a': 1}
    >>> parse_tool_calls('<tool_call>{"name": add}</tool_call>')[0].error
    'not valid JSON: Expecting value at char 9'
    >>> parse_tool_calls("no call here, or an unfinished <tool_call>{")
    []
    """
    return [_parse_one(body) for body in TOOL_CALL.findall(text)]


def _parse_one(body: str) -> ToolCall:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as error:
        return ToolCall("", error=f"not valid JSON: {error.msg} at char {error.pos}")
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) or not payload["name"]:
        return ToolCall("", error='expected {"name": <tool name>, "arguments": {...}}')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's style: the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return ToolCall(payload["name"], error=f"arguments are not valid JSON: {error.msg}")
    if not isinstance(arguments, dict):
        return ToolCall(payload["name"], error="arguments must be a JSON object")
    return ToolCall(payload["name"], arguments)
