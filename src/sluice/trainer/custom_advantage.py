"""``--custom-advantage-function-path``: a user function replaces the advantage estimator.

Contract (checked at start-up)::

    def my_advantages(inputs: AdvantageInputs) -> torch.Tensor:      # [B, T-1], read only where loss_mask is 1
        scores = torch.tensor([r for group in inputs.rewards for r in group])
        return inputs.broadcast(scores - scores.mean())

It runs once per rollout, after the old/reference logprobs, before the optimizer steps; --kl-coef is not
applied (the function sees ``batch.ref_log_probs`` and can apply its own). slime's ``fn(args, rollout_data)``
gets slime's per-sample lists (``rewards``, ``response_lengths``, ``loss_masks``, ``log_probs``,
``ref_log_probs``, ``rollout_log_probs``; tensors per response token) and must set ``rollout_data["advantages"]``
to one tensor per sample (per response token), or return that list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sluice.algorithms import broadcast_to_tokens
from sluice.plugins import Contract, load_plugin
from sluice.types import TrainBatch

FLAG = "--custom-advantage-function-path"
CONTRACT = Contract(FLAG, "fn(inputs: AdvantageInputs) -> Tensor [B, T-1]", 1,
                    "fn(args, rollout_data: dict) -> None (sets rollout_data['advantages'])", 2, sync_only=True)


@dataclass
class AdvantageInputs:
    """One rollout's trained samples; rows of ``batch`` are in group order (group 0's samples first)."""

    rewards: list[list[float]]  # scalar reward per sample, per group (failed samples dropped)
    batch: TrainBatch  # loss_mask, old/ref/rollout logprobs [B, T-1]; input_ids [B, T]
    response_starts: list[int]  # per row: target position of the first response token (prompt length - 1)
    response_lengths: list[int]  # per row: response tokens (generated and appended)

    def broadcast(self, per_sample: Tensor) -> Tensor:
        """One value per sample ``[B]`` -> ``[B, T-1]`` on its trained tokens."""
        return broadcast_to_tokens(per_sample.to(torch.float64), self.batch.loss_mask).float()


AdvantageFn = Callable[[AdvantageInputs], Tensor]


def _response_slices(inputs: AdvantageInputs, tensor: Tensor | None) -> list[Tensor] | None:
    if tensor is None:
        return None
    return [tensor[row, start:start + length].clone()
            for row, (start, length) in enumerate(zip(inputs.response_starts, inputs.response_lengths))]


def slime_rollout_data(inputs: AdvantageInputs) -> dict[str, Any]:
    """The fields of slime's ``rollout_data`` an advantage function reads, per sample."""
    batch = inputs.batch
    rewards = [r for group in inputs.rewards for r in group]
    return {"rewards": rewards, "raw_reward": list(rewards), "response_lengths": list(inputs.response_lengths),
            "total_lengths": batch.attention_mask.sum(dim=1).tolist(),
            "loss_masks": _response_slices(inputs, batch.loss_mask),
            "log_probs": _response_slices(inputs, batch.old_log_probs),
            "ref_log_probs": _response_slices(inputs, batch.ref_log_probs),
            "rollout_log_probs": _response_slices(inputs, batch.rollout_log_probs)}


def _from_per_sample(inputs: AdvantageInputs, values: list[Any], path: str) -> Tensor:
    if not isinstance(values, (list, tuple)) or len(values) != len(inputs.response_lengths):
        raise TypeError(f"{path}: rollout_data['advantages'] must hold one tensor per sample "
                        f"({len(inputs.response_lengths)})")
    out = torch.zeros_like(inputs.batch.loss_mask)
    for row, (value, start, length) in enumerate(zip(values, inputs.response_starts, inputs.response_lengths)):
        per_token = torch.as_tensor(value, dtype=out.dtype).flatten()
        if per_token.numel() == 1:
            per_token = per_token.expand(length)
        if per_token.numel() != length:
            raise TypeError(f"{path}: sample {row} has {length} response tokens but {per_token.numel()} advantages")
        out[row, start:start + length] = per_token
    return out


def load_custom_advantage(path: str, slime_args: Any = None) -> AdvantageFn:
    plugin = load_plugin(path, CONTRACT)

    def advantages(inputs: AdvantageInputs) -> Tensor:
        if plugin.slime_form:
            data = slime_rollout_data(inputs)
            returned = plugin.call_sync(slime_args, data)
            result = _from_per_sample(inputs, returned if returned is not None else data.get("advantages"), path)
        else:
            result = plugin.call_sync(None, inputs)
        expected = tuple(inputs.batch.loss_mask.shape)
        if not isinstance(result, Tensor) or tuple(result.shape) != expected:
            shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
            raise TypeError(f"{path}: must return a tensor of shape {expected} ([B, T-1]), got {shape}")
        return (result.float() * inputs.batch.loss_mask).detach()

    return advantages
