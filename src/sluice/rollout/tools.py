"""Tools for multi-turn generation (``--tools``): plain typed Python functions, described and called by name.

A tool is any function whose parameters are annotated with JSON types (``str``, ``int``, ``float``, ``bool``,
``list[...]``, ``dict``) and whose return value is text or anything ``str()`` renders. Its name, the first
paragraph of its docstring and its parameters become an OpenAI-style function schema, which the chat template
shows to the model (``apply_chat_template(..., tools=schemas)``). Calls run with a timeout; a sync tool runs in a
daemon thread. Every problem a call can have (unknown tool, bad arguments, the tool raising, a timeout) becomes
the tool's answer, ``error: ...``, so the model sees it and the rollout goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from sluice.plugins import PluginSignatureError, call_in_thread, is_async_callable, resolve
from sluice.rollout.tool_calls import ToolCall

FLAG = "--tools"
DEFAULT_TOOL_TIMEOUT_S = 30.0
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}

    @property
    def required(self) -> list[str]:
        return self.schema["function"]["parameters"]["required"]


def _json_schema(hint: Any, where: str) -> dict[str, Any]:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return _json_schema(options[0], where)
        raise PluginSignatureError(f"{where}: union types other than X | None are not supported")
    if origin in (list, tuple) or hint in (list, tuple):
        items = get_args(hint)
        return {"type": "array", "items": _json_schema(items[0], where)} if items else {"type": "array"}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise PluginSignatureError(f"{where}: annotation {hint!r} is not a JSON type (str, int, float, bool, list, dict)")


def tool_from_function(fn: Callable[..., Any], path: str) -> Tool:
    """Describe ``fn`` as a tool; refuses untyped parameters, *args/**kwargs, naming the flag and path."""
    where = f"{FLAG} {path!r}"
    if not callable(fn):
        raise PluginSignatureError(f"{where}: it is a {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
        hints = get_type_hints(fn)
    except (TypeError, ValueError, NameError) as error:
        raise PluginSignatureError(f"{where}: cannot read the signature and annotations: {error}") from error
    properties, required = {}, []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise PluginSignatureError(f"{where}: *{param.name} cannot be described to the model; name every "
                                       "parameter")
        if param.name not in hints:
            raise PluginSignatureError(f"{where}: parameter {param.name!r} has no type annotation; a tool is a "
                                       "typed function, e.g. def calculator(expression: str) -> str")
        properties[param.name] = _json_schema(hints[param.name], f"{where} parameter {param.name!r}")
        if param.default is param.empty:
            required.append(param.name)
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    name = getattr(fn, "__name__", path.rsplit(".", 1)[-1])
    schema = {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}
    return Tool(name, fn, schema)


class ToolBox:
    """The tools of a run, by name; ``run`` answers one call with the tool message for the chat template."""

    def __init__(self, tools: list[Tool], timeout_s: float = DEFAULT_TOOL_TIMEOUT_S):
        names = [t.name for t in tools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PluginSignatureError(f"{FLAG}: two tools are named {duplicates}; tool names must be unique")
        self.tools = {t.name: t for t in tools}
        self.timeout_s = timeout_s

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools.values()]

    async def run(self, call: ToolCall) -> dict[str, str]:
        """The ``{"role": "tool", "name", "content"}`` message answering ``call``."""
        return {"role": "tool", "name": call.name or "unknown", "content": await self._answer(call)}

    async def _answer(self, call: ToolCall) -> str:
        if call.error is not None:
            return f"error: malformed tool call: {call.error}"
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: unknown tool {call.name!r}; available: {', '.join(self.tools)}"
        missing = [name for name in tool.required if name not in call.arguments]
        unknown = sorted(set(call.arguments) - set(tool.schema["function"]["parameters"]["properties"]))
        if missing or unknown:
            return f"error: {call.name} needs {tool.required}" + (f", got unknown {unknown}" if unknown else "")
        try:
            if is_async_callable(tool.fn):
                result = await asyncio.wait_for(tool.fn(**call.arguments), self.timeout_s)
            else:
                result = await asyncio.wait_for(call_in_thread(lambda: tool.fn(**call.arguments)), self.timeout_s)
        except TimeoutError:
            return f"error: {call.name} timed out after {self.timeout_s:g}s"
        except Exception as error:  # noqa: BLE001 - the tool's failure is the model's observation
            return f"error: {type(error).__name__}: {error}"
        return result if isinstance(result, str) else str(result)


def load_tools(paths: list[str], timeout_s: float = DEFAULT_TOOL_TIMEOUT_S) -> ToolBox:
    """The tools at ``paths`` (``pkg.mod:fn``, ``pkg.mod.fn`` or ``file.py:fn``), checked at start-up."""
    return ToolBox([tool_from_function(resolve(path, FLAG), path) for path in paths], timeout_s)
