"""The row type of the slime / Megatron / SGLang flag tables (megatron_flags.py, slime_flags.py, sglang_flags.py)."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class Treatment(str, Enum):
    IMPLEMENTED = "implemented"
    MAPPED = "mapped"
    CHECKED = "checked against the checkpoint"
    NOOP = "accepted no-op"
    REJECTED = "rejected"


class Row(NamedTuple):
    """What one slime, Megatron or SGLang flag does in sluice.

    ``note`` says it in a line: for a no-op, the behaviour sluice already has; for a refusal, the feature and what
    to do instead. ``takes`` is the flag's arity where sluice has no config field of that name (a no-op or a flag
    mapped by slime_compat.resolve): ``switch`` (no value), ``value`` (one word) or ``values`` (one or more), so the
    parser consumes its words as slime's parser would.
    """

    treatment: Treatment
    note: str
    takes: str = ""


def noop(note: str, takes: str = "") -> Row:
    return Row(Treatment.NOOP, note, takes)


def refuse(note: str, takes: str = "") -> Row:
    return Row(Treatment.REJECTED, note, takes)


def mapped(note: str, takes: str = "") -> Row:
    return Row(Treatment.MAPPED, note, takes)


def implemented(note: str) -> Row:
    return Row(Treatment.IMPLEMENTED, note)


def checked(note: str) -> Row:
    return Row(Treatment.CHECKED, note)
