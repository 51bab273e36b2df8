"""Evaluation: the request an eval function gets, the built-in one, and loading ``--eval-function-path``.

Contract: ``async evaluate(request: EvalRequest) -> dict[str, float]``, metrics logged as they are named (the
built-in one writes ``eval/<set>/reward_mean`` and ``eval/<set>/accuracy``, the fraction of rewards >=
``request.accuracy_threshold``). slime's ``fn(args, rollout_id,
data_source, evaluation=True)`` returning ``{set: {"rewards": [...], ...}}`` (or an object with ``.data``) is
turned into the same two metrics per set.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sluice.plugins import Contract, load_plugin
from sluice.rollout.manager import RolloutManager
from sluice.rollout.metrics import accuracy
from sluice.rollout.step import PromptBatches, SlimeDataSource
from sluice.types import Sample, SamplingParams

FLAG = "--eval-function-path"
CONTRACT = Contract(FLAG, "async fn(request: EvalRequest) -> dict[str, float]", 1,
                    "fn(args, rollout_id, data_source, evaluation=True) -> {set: {'rewards': [...]}}", 3)


@dataclass
class EvalRequest:
    rollout_id: int  # rollout steps completed (0: before training)
    eval_sets: dict[str, list[Sample]]  # --eval-prompt-data, by name
    n_samples: int  # --n-samples-per-eval-prompt
    sampling_params: SamplingParams  # eval sampling settings (--eval-temperature, ...)
    manager: RolloutManager
    source: PromptBatches | None = None  # the training prompt source (slime's functions receive it)
    accuracy_threshold: float = 1.0  # --eval-accuracy-threshold: accuracy counts rewards >= this


EvalFn = Callable[[EvalRequest], Awaitable[dict[str, float]]]


def reward_metrics(name: str, rewards: list[float], accuracy_threshold: float = 1.0) -> dict[str, float]:
    """Mean reward and accuracy (the fraction of rewards >= ``accuracy_threshold``) of one eval set."""
    if not rewards:
        return {}
    return {f"eval/{name}/reward_mean": statistics.fmean(rewards),
            f"eval/{name}/accuracy": accuracy(rewards, accuracy_threshold)}


async def default_evaluate(request: EvalRequest) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, samples in request.eval_sets.items():
        groups = await request.manager.generate_groups(samples, request.n_samples, request.sampling_params,
                                                       shape_rewards=False)
        out.update(reward_metrics(name, [r for g in groups for r in request.manager.rewards(g)],
                                  request.accuracy_threshold))
    return out


def _slime_metrics(value: Any, source: str, accuracy_threshold: float) -> dict[str, float]:
    data = getattr(value, "data", value)
    if not isinstance(data, dict):
        raise TypeError(f"{source} returned a {type(data).__name__}; expected {{set: {{'rewards': [...]}}}}")
    out: dict[str, float] = {}
    for name, entry in data.items():
        rewards = entry.get("rewards") if isinstance(entry, dict) else None
        if rewards is None:
            raise TypeError(f"{source}: eval set {name!r} has no 'rewards' list")
        out.update(reward_metrics(str(name), [float(r) for r in rewards], accuracy_threshold))
    return out


def load_eval_fn(path: str, slime_args: Any = None) -> EvalFn:
    plugin = load_plugin(path, CONTRACT)

    async def evaluate(request: EvalRequest) -> dict[str, float]:
        if plugin.slime_form:
            source = SlimeDataSource(request.source, request.n_samples) if request.source is not None else None
            return _slime_metrics(await plugin.call(slime_args, request.rollout_id, source, True), path,
                                  request.accuracy_threshold)
        metrics = await plugin.call(None, request)
        if not isinstance(metrics, dict):
            raise TypeError(f"{path} returned a {type(metrics).__name__}; expected dict[str, float]")
        return {str(k): float(v) for k, v in metrics.items()}

    evaluate.__name__ = evaluate.__qualname__ = plugin.name
    evaluate.slime_form = plugin.slime_form
    return evaluate
