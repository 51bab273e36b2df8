"""Rollout: runs the generate function over engines, scores samples, evaluates; the records plug-ins receive.

The names below are imported on first use (the gateway pulls in the HTTP stack only when asked for).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AgentTask": "sluice.rollout.agent",
    "EvalRequest": "sluice.rollout.evaluation",
    "GenerateContext": "sluice.rollout.generate",
    "RolloutManager": "sluice.rollout.manager",
    "RolloutOutput": "sluice.rollout.step",
    "RolloutRequest": "sluice.rollout.step",
    "ToolBox": "sluice.rollout.tools",
    "generate_single_turn": "sluice.rollout.generate",
    "generate_with_tools": "sluice.rollout.multi_turn",
    "turn_seed": "sluice.rollout.seeds",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sluice.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
