"""The sampling settings of training rollouts (--rollout-temperature, ...) and of evaluation (--eval-*)."""

from __future__ import annotations

from sluice.config import EvalConfig, RolloutConfig
from sluice.types import SamplingParams


def sampling_params(rollout: RolloutConfig, evaluation: EvalConfig | None = None) -> SamplingParams:
    """A fresh SamplingParams (callers may change theirs); with ``evaluation``, its settings where given."""
    params = SamplingParams(
        temperature=rollout.rollout_temperature, top_p=rollout.rollout_top_p, top_k=rollout.rollout_top_k,
        max_new_tokens=rollout.rollout_max_response_len, stop=list(rollout.rollout_stop),
        stop_token_ids=list(rollout.rollout_stop_token_ids),
    )
    if evaluation is not None:
        ev = evaluation
        params.temperature = ev.eval_temperature if ev.eval_temperature is not None else params.temperature
        params.top_p = ev.eval_top_p if ev.eval_top_p is not None else params.top_p
        params.top_k = ev.eval_top_k if ev.eval_top_k is not None else params.top_k
        params.max_new_tokens = ev.eval_max_response_len or params.max_new_tokens
    return params
