"""Metric names that the console and the plots look for, kept in one place so writers and readers agree."""

from __future__ import annotations

import re

REWARD_MEAN = "rollout/reward_mean"
STEP_TIME = "perf/step_time_s"
# Eval metrics are namespaced by dataset: eval/<dataset name>/accuracy.
EVAL_ACCURACY = re.compile(r"^eval/(?P<name>.+)/accuracy$")


def eval_accuracy_name(key: str) -> str | None:
    """The dataset name in an ``eval/<name>/accuracy`` key, or None for any other key."""
    match = EVAL_ACCURACY.match(key)
    return match["name"] if match else None

# Tokens each stage processed in a step; with the stage's time they give perf/<stage>_tokens_per_s.
STAGE_TOKENS = {
    "rollout": "rollout/response_tokens",  # generated tokens
    "train": "train/num_tokens",  # prompt + response tokens through the trainer's forward and backward
    "eval": "eval/response_tokens",  # generated tokens over every eval set
}
