"""The model's context, split between prompt and response: read before any model loads, checked against the flags.

The engine holds prompt + response in one context. A response budget at or past it leaves no room for a prompt;
a prompt past what the budget leaves has its response cut short by the context (or fails its request when the
prompt alone does not fit). Each is reported at start-up, with the numbers and where they came from, instead of
surfacing as a short or failed sample during the rollout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from sluice.config import Config, ConfigError
from sluice.data.prompt_checks import PromptLimit


@dataclass(frozen=True)
class ModelContext:
    """The engine's context length in tokens and where the number came from (for messages)."""

    num_tokens: int
    source: str  # "--sglang-context-length" or "max_position_embeddings in <checkpoint>/config.json"


def read_context(config: Config, checkpoint: str) -> ModelContext | None:
    """--sglang-context-length, else the checkpoint's max_position_embeddings (its text model's, for a
    multimodal config); None when neither is known, and the engine reports what it finds."""
    if config.engine.context_length is not None:
        return ModelContext(config.engine.context_length, "--sglang-context-length")
    config_file = Path(checkpoint) / "config.json"
    try:
        context = getattr(AutoConfig.from_pretrained(checkpoint).get_text_config(), "max_position_embeddings", None)
    except (OSError, ValueError):  # a model type this transformers does not know: the file's own field
        context = json.loads(config_file.read_text()).get("max_position_embeddings")
    if not isinstance(context, int):
        return None
    return ModelContext(context, f"max_position_embeddings in {config_file}")


def _response_budgets(config: Config) -> list[tuple[str, int]]:
    """(flag, value) of each response budget that is set. SFT from data generates only for its eval sets, with
    --eval-max-response-len (default --rollout-max-response-len)."""
    budgets = [("--rollout-max-response-len", config.rollout.rollout_max_response_len),
               ("--eval-max-response-len", config.eval.eval_max_response_len)]
    budgets = [(flag, value) for flag, value in budgets if value is not None]
    if not config.rollout.sft_from_data:
        return budgets
    if not config.eval_sets:
        return []
    if config.eval.eval_max_response_len is None:
        return [("--eval-max-response-len (default: --rollout-max-response-len)", budgets[0][1])]
    return budgets[-1:]


def check_budgets(config: Config, context: ModelContext | None) -> None:
    """Every response budget, and --rollout-max-prompt-len with it, must fit the context. SFT from data
    generates only for its eval sets: only the eval's budget applies (its training samples are checked whole,
    see context_prompt_limit)."""
    if context is None:
        return
    total = context.num_tokens
    for flag, value in _response_budgets(config):
        if value >= total:
            raise ConfigError(f"{flag} {value} leaves no room for a prompt in the model's context of {total} "
                              f"tokens ({context.source}): set it below {total}, to the longest response you expect")
    prompt_len = config.data.rollout_max_prompt_len
    for flag, value in _response_budgets(config):
        if prompt_len is not None and prompt_len + value > total:
            raise ConfigError(
                f"--rollout-max-prompt-len {prompt_len} plus {flag} {value} is {prompt_len + value} tokens, more "
                f"than the model's context of {total} ({context.source}): a long prompt would have its response "
                f"cut short; lower one of them so they add up to at most {total}")


def context_prompt_limit(config: Config, context: ModelContext | None, *, for_eval: bool) -> PromptLimit | None:
    """The most tokens a prompt may have so that a full response still fits (an error past it, not a drop)."""
    if context is None:
        return None
    if config.rollout.sft_from_data and not for_eval:  # a finished sample: prompt and response share the context
        return PromptLimit(context.num_tokens, f"the model's context of {context.num_tokens} tokens "
                           f"({context.source}), which holds an SFT sample's prompt and response together",
                           drops_longer=False)
    flag, response_len = "--rollout-max-response-len", config.rollout.rollout_max_response_len
    if for_eval and config.eval.eval_max_response_len is not None:
        flag, response_len = "--eval-max-response-len", config.eval.eval_max_response_len
    source = (f"the model's context of {context.num_tokens} tokens ({context.source}) minus {flag} "
              f"{response_len}")
    return PromptLimit(context.num_tokens - response_len, source, drops_longer=False)
