"""``--loss-type custom_loss``: a user function replaces the policy-gradient term of the loss.

The contract (checked when the run starts, so a wrong function fails before any model loads)::

    def my_loss(inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        per_token = -inputs.batch.advantages * inputs.log_probs      # [B, T-1]
        return inputs.reduce(per_token), {"my_metric": inputs.reduce(per_token.detach())}

It is called once per micro-batch, with gradients on. ``reduce`` applies --loss-agg-mode with the counts of the
whole optimizer step, so returning ``reduce(per_token)`` keeps the result independent of micro-batching (the
micro-batch losses are summed). Metrics are summed over micro-batches too (reduce them the same way) and logged
as ``train/<name>``; a metric may be a float or a 0-d tensor (left on the device: the step reads every metric
back at once, where ``.item()`` would wait for the device at each micro-batch). --use-kl-loss and
--entropy-coef still add their terms to the returned loss.

``--custom-loss-function-path`` accepts ``pkg.module.fn``, ``pkg.module:fn`` and ``path/to/file.py:fn``.
slime's ``f(args, batch, logits, reducer)`` form is not supported: its batch is Megatron's dict; port it to
``LossInputs`` (``inputs.batch`` holds the same per-token tensors).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sluice.plugins import Contract, PluginSignatureError, load_plugin, resolve
from sluice.types import TrainBatch

FLAG = "--custom-loss-function-path"
CONTRACT = Contract(FLAG, "fn(inputs: LossInputs) -> (loss, metrics)", 1, sync_only=True)


@dataclass
class LossInputs:
    """What a custom loss function receives for one micro-batch; per-token tensors are ``[B, T-1]``."""

    log_probs: Tensor  # float32, requires grad: log pi(target token) at the rollout temperature
    entropy: Tensor | None  # float32, requires grad: entropy of the next-token distribution
    batch: TrainBatch  # the micro-batch: loss_mask, advantages, old/ref/rollout logprobs, rewards
    reduce: Callable[[Tensor], Tensor]  # per-token [B, T-1] -> this micro-batch's share of the step's scalar


CustomLossFn = Callable[[LossInputs], tuple[Tensor, dict[str, float]]]


def load_custom_loss(path: str) -> CustomLossFn:
    """Import the function at ``path`` and check it takes one ``LossInputs``; errors name the flag and the path.

    slime's ``f(args, batch, logits, reducer)`` is refused with a hint: its batch is Megatron's dict.
    """
    try:
        return load_plugin(path, CONTRACT).fn
    except PluginSignatureError as error:
        fn = resolve(path, FLAG)
        if callable(fn) and _num_required(fn) == 4:
            raise PluginSignatureError(f"{error} (slime's (args, batch, logits, reducer) form is not supported: "
                                       "port it to LossInputs)") from None
        raise


def _num_required(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return -1
    return sum(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in params)


def call_custom_loss(fn: CustomLossFn, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Run ``fn`` and check what it returned: a scalar tensor and a dict of numbers (floats, or 0-d tensors,
    which stay on the device until the step reads its metrics back once)."""
    result = fn(inputs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"the custom loss function must return (loss, metrics), got {type(result).__name__}")
    loss, metrics = result
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise TypeError(f"the custom loss must be a 0-d tensor (use inputs.reduce), got {_describe(loss)}")
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in metrics.items()):
        raise TypeError(f"the custom loss metrics must be a dict of str -> float (or 0-d tensor), got {metrics!r}")
    return loss, {f"train/{key}": value.detach() if isinstance(value, Tensor) else float(value)
                  for key, value in metrics.items()}


def _is_number(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.dim() == 0 and value.dtype != torch.bool
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
