"""A tiny name -> function registry, one namespace ("kind") per family of variants.

Why: the trainer picks an advantage estimator, a policy loss, a KL estimator or an aggregation mode from a
string on the command line. Keeping the mapping here (and not as if/else chains in the trainer) means a new
variant is one decorated function, and a typo fails loudly with the list of valid names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

_REGISTRY: dict[str, dict[str, Callable]] = {}


def register(kind: str, name: str) -> Callable[[F], F]:
    """Decorator: file ``fn`` under ``(kind, name)``; registering the same name twice is an error."""

    def deco(fn: F) -> F:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not fn:
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__qualname__})")
        table[name] = fn
        return fn

    return deco


def get(kind: str, name: str) -> Callable:
    """The function registered under ``(kind, name)``; a clear KeyError listing valid names otherwise."""
    if kind not in _REGISTRY:
        raise KeyError(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    table = _REGISTRY[kind]
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(table))}")
    return table[name]


def names(kind: str) -> list[str]:
    """Sorted names registered under ``kind`` (empty if the kind is unknown); handy for CLI choices."""
    return sorted(_REGISTRY.get(kind, {}))
