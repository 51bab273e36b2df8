"""Dotted key paths into nested rows: ``reward_model.ground_truth``, ``extra_info.index``, ``prompt.0.content``.

A key that exists literally (``"a.b"`` at the top level) wins over the nested reading, so files whose column
names contain dots keep working. A part made of digits indexes a list. A path that breaks raises
``MissingKey`` naming the part where it broke and the keys present at that level, which is what a user needs to
fix a flag: "'reward_model' has no 'answer'; keys present at 'reward_model': ['ground_truth', 'style']".
"""

from __future__ import annotations

from typing import Any


class MissingKey(LookupError):
    """A key path that does not lead to a value; ``detail`` says where it broke."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"missing key {path!r}: {detail}")
        self.path, self.detail = path, detail


def _keys_present(value: dict[str, Any]) -> str:
    return f"keys present: {sorted(map(str, value))}" if value else "the row is empty"


def _broken_at(at: str, part: str, value: Any) -> str:
    """Why ``part`` cannot be taken from ``value``, the object found at ``at`` ("" is the row itself)."""
    if isinstance(value, dict) and not at:
        return _keys_present(value)
    if isinstance(value, dict):
        keys = f"keys present at {at!r}: {sorted(map(str, value))}" if value else f"{at!r} is empty"
        return f"{at!r} has no {part!r}; {keys}"
    if isinstance(value, list):
        return f"{at!r} is a list of {len(value)}, {part!r} is not an index into it"
    return f"{at!r} is {'null' if value is None else 'a ' + type(value).__name__}, not an object"


def lookup(row: dict[str, Any], path: str) -> Any:
    """The value at ``path`` in ``row``; raises ``MissingKey`` when a part is absent."""
    if path in row:
        return row[path]
    parts = path.split(".")
    value: Any = row
    for depth, part in enumerate(parts):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise MissingKey(path, _broken_at(".".join(parts[:depth]), part, value))
    return value


def find(row: dict[str, Any], path: str, default: Any = None) -> Any:
    """The value at ``path``, or ``default`` when any part is absent (for optional keys such as metadata)."""
    try:
        return lookup(row, path)
    except MissingKey:
        return default
