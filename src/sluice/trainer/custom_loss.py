"""``--loss-type custom_loss``: a user function replaces the policy-gradient term of the loss.

The contract (checked when the run starts, so a wrong function fails before any model loads)::

    def my_loss(inputs: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
        per_token = -inputs.batch.advantages * inputs.log_probs      # [B, T-1]
        return inputs.reduce(per_token), {"my_metric": inputs.reduce(per_token.detach()).item()}

It is called once per micro-batch, with gradients on. ``reduce`` applies --loss-agg-mode with the counts of the
whole optimizer step, so returning ``reduce(per_token)`` keeps the result independent of micro-batching (the
micro-batch losses are summed). Metrics are summed over micro-batches too (reduce them the same way) and logged
as ``train/<name>``. --use-kl-loss and --entropy-coef still add their terms to the returned loss.

``--custom-loss-function-path`` accepts ``pkg.module.fn``, ``pkg.module:fn`` and ``path/to/file.py:fn``.
slime's ``f(args, batch, logits, reducer)`` form is not supported: its batch is Megatron's dict; port it to
``LossInputs`` (``inputs.batch`` holds the same per-token tensors).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sluice.types import TrainBatch

FLAG = "--custom-loss-function-path"
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass
class LossInputs:
    """What a custom loss function receives for one micro-batch; per-token tensors are ``[B, T-1]``."""

    log_probs: Tensor  # float32, requires grad: log pi(target token) at the rollout temperature
    entropy: Tensor | None  # float32, requires grad: entropy of the next-token distribution
    batch: TrainBatch  # the micro-batch: loss_mask, advantages, old/ref/rollout logprobs, rewards
    reduce: Callable[[Tensor], Tensor]  # per-token [B, T-1] -> this micro-batch's share of the step's scalar


CustomLossFn = Callable[[LossInputs], tuple[Tensor, dict[str, float]]]


def _import_target(path: str) -> tuple[Any, str]:
    """(module, attribute path) for ``pkg.mod.fn``, ``pkg.mod:fn`` or ``file.py:fn``."""
    if path.endswith(".py"):
        raise ValueError(f"{FLAG} {path!r}: name the function too, as 'path/to/file.py:fn'")
    if ":" in path:
        module_part, _, attr = path.partition(":")
    else:
        module_part, _, attr = path.rpartition(".")
    if not module_part or not attr:
        raise ValueError(f"{FLAG} {path!r} must look like 'pkg.module.fn', 'pkg.module:fn' or 'path/to/file.py:fn'")
    if module_part.endswith(".py") or "/" in module_part:
        file = Path(module_part)
        if not file.is_file():
            raise ImportError(f"{FLAG} {path!r}: no such file {module_part}")
        name = f"sluice_custom_loss_{file.stem}"
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ImportError(f"{FLAG} {path!r}: importing {module_part} failed: {type(exc).__name__}: {exc}") from exc
        return module, attr
    try:
        return importlib.import_module(module_part), attr
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ImportError(f"{FLAG} {path!r}: cannot import {module_part!r}: {type(exc).__name__}: {exc}") from exc


def load_custom_loss(path: str) -> CustomLossFn:
    """Import the function at ``path`` and check it takes one ``LossInputs``; errors name the flag and the path."""
    module, attr = _import_target(path)
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ImportError(f"{FLAG} {path!r}: {module.__name__} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"{FLAG} {path!r}: {attr!r} is a {type(fn).__name__}, not a function")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"{FLAG} {path!r}: the loss function must be synchronous (it runs inside backward passes)")
    _check_signature(fn, path)
    return fn


def _check_signature(fn: Callable, path: str) -> None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{FLAG} {path!r}: cannot read the function's signature: {exc}") from exc
    required = [p for p in params if p.kind in _POSITIONAL and p.default is inspect.Parameter.empty]
    takes_one = len(required) == 1 or (not required and any(
        p.kind in _POSITIONAL or p.kind is inspect.Parameter.VAR_POSITIONAL for p in params))
    required_keywords = [p.name for p in params
                         if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    if not takes_one or required_keywords:
        shown = f"({', '.join(p.name for p in params)})"
        hint = " (slime's (args, batch, logits, reducer) form is not supported)" if len(required) == 4 else ""
        raise TypeError(f"{FLAG} {path!r}: the function takes {shown}; it must take one argument, "
                        f"fn(inputs: LossInputs) -> (loss, metrics){hint}")


def call_custom_loss(fn: CustomLossFn, inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Run ``fn`` and check what it returned: a scalar tensor and a dict of numbers."""
    result = fn(inputs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"the custom loss function must return (loss, metrics), got {type(result).__name__}")
    loss, metrics = result
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise TypeError(f"the custom loss must be a 0-d tensor (use inputs.reduce), got {_describe(loss)}")
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items()):
        raise TypeError(f"the custom loss metrics must be a dict of str -> float, got {metrics!r}")
    return loss, {f"train/{key}": float(value) for key, value in metrics.items()}


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
