"""Loading a user reward function from ``--custom-rm-path`` and adapting it to ``RewardFn``.

Two call forms are accepted so that slime reward functions work unchanged: sluice's ``fn(sample)`` and
slime's ``fn(args, sample)``. Either may be sync (run in a worker thread, so a slow scorer does not stall
the event loop that drives generation) or async (awaited directly).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from sluice.rewards.contract import RewardFn, RewardValue, as_reward_value
from sluice.types import Sample

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def split_path(path: str) -> tuple[str, str]:
    """``pkg.mod:fn`` or ``pkg.mod.fn`` -> (module name, attribute path)."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"custom reward path {path!r} must look like 'package.module.function' or 'package.module:function'"
        )
    return module_name, attr


def load_callable(path: str) -> Callable[..., Any]:
    """Import the object named by ``path``; errors name the path and the missing piece."""
    module_name, attr = split_path(path)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ImportError(
            f"custom reward path {path!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"custom reward path {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"custom reward path {path!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def takes_args_first(fn: Callable[..., Any], path: str) -> bool:
    """True for slime's ``(args, sample)`` form, False for ``(sample)``; decided by required positionals."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"custom reward path {path!r}: cannot read the function's signature: {exc}") from exc
    positional = [p for p in params if p.kind in _POSITIONAL]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if len(required) >= 2:
        return True
    if positional or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return False
    raise TypeError(f"custom reward path {path!r}: the function must take (sample) or (args, sample)")


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def adapt(fn: Callable[..., Any], path: str, slime_args: Any = None) -> RewardFn:
    """Wrap ``fn`` as an async ``(sample) -> float | dict`` with its result coerced to floats."""
    leading: tuple[Any, ...] = (slime_args,) if takes_args_first(fn, path) else ()
    is_async = _is_async(fn)

    async def reward(sample: Sample) -> RewardValue:
        if is_async:
            result = await fn(*leading, sample)
        else:
            result = await asyncio.to_thread(fn, *leading, sample)
            if inspect.isawaitable(result):  # a sync wrapper that hands back a coroutine
                result = await result
        return as_reward_value(result, path)

    reward.__name__ = getattr(fn, "__name__", "custom_reward")
    reward.__qualname__ = reward.__name__
    return reward


def load_custom_reward(path: str, slime_args: Any = None) -> RewardFn:
    """The reward function at ``path`` (see ``load_callable``), adapted to ``RewardFn``."""
    return adapt(load_callable(path), path, slime_args)
