"""Turning rows of a prompt file into ``Sample`` records: pick keys, render chat templates, tokenize, filter.

All row problems are ``DataError`` naming the file, line (or row) and key, raised at load time, so a bad
dataset fails before any GPU work starts rather than hours later when the bad row comes up in a batch.
Prompts over ``--rollout-max-prompt-len`` are dropped and counted in a ``LoadReport``, never silently.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

from sluice.config.sections import DataConfig
from sluice.data.files import DataError, LocatedRow, read_located_rows
from sluice.types import Sample


class PromptTokenizer(Protocol):
    """The part of a Hugging Face tokenizer that prompt loading uses."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...


@dataclass
class LoadReport:
    """What loading did, for the caller to print; ``max_prompt_len`` is the configured limit (None: none)."""

    num_rows: int
    num_kept: int
    num_dropped_too_long: int
    max_prompt_len: int | None
    longest_kept_len: int = 0  # longest kept prompt in tokens, to help pick the limit and the context size

    def describe(self) -> str:
        text = f"loaded {self.num_kept} of {self.num_rows} prompts (longest {self.longest_kept_len} tokens)"
        if self.max_prompt_len is not None:
            text += f"; dropped {self.num_dropped_too_long} longer than {self.max_prompt_len} tokens"
        return text


def _keys_hint(row: dict[str, Any]) -> str:
    return f"keys present: {sorted(map(str, row))}" if row else "the row is empty"


def _required(located: LocatedRow, key: str, flag: str) -> Any:
    if key not in located.row:
        raise DataError(f"{located.where}: missing key {key!r} (set by {flag}); {_keys_hint(located.row)}")
    return located.row[key]


def _check_messages(where: str, key: str, messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages must be dicts with a string role and string content, the shape chat templates expect."""
    if not messages:
        raise DataError(f"{where}: {key!r} is an empty list of chat messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise DataError(f"{where}: {key!r}[{i}] must be a dict with 'role' and 'content', got {kind}")
        for field_name in ("role", "content"):
            if not isinstance(message.get(field_name), str):
                raise DataError(
                    f"{where}: {key!r}[{i}] needs a string {field_name!r}, got {message.get(field_name)!r}"
                )
    return messages


def render_prompt(located: LocatedRow, prompt: Any, config: DataConfig, tokenizer: PromptTokenizer) -> str:
    """The text the engine sees: the chat-templated prompt, or the raw string without --apply-chat-template."""
    key, where = config.input_key, located.where
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = _check_messages(where, key, prompt)
    else:
        raise DataError(f"{where}: {key!r} must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not config.apply_chat_template:
        if isinstance(prompt, str):
            return prompt
        raise DataError(f"{where}: {key!r} is a list of chat messages; pass --apply-chat-template to render it")
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **config.apply_chat_template_kwargs
        )
    except Exception as exc:  # jinja errors are opaque without the row they came from
        raise DataError(f"{where}: chat template failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(text, str):
        raise DataError(f"{where}: chat template returned {type(text).__name__}, expected text")
    return text


def _sample_from_row(located: LocatedRow, config: DataConfig, tokenizer: PromptTokenizer) -> Sample:
    prompt = _required(located, config.input_key, "--input-key")
    label = _required(located, config.label_key, "--label-key") if config.label_key else None
    # None counts as absent: parquet fills a column missing from some rows with nulls.
    raw_metadata = located.row.get(config.metadata_key)
    if raw_metadata is not None and not isinstance(raw_metadata, dict):
        raise DataError(
            f"{located.where}: {config.metadata_key!r} (--metadata-key) must be an object, "
            f"got {type(raw_metadata).__name__}"
        )
    text = render_prompt(located, prompt, config, tokenizer)
    metadata = copy.deepcopy(raw_metadata) if raw_metadata else {}
    metadata["prompt_text"] = text
    return Sample(
        prompt=copy.deepcopy(prompt),
        prompt_tokens=list(tokenizer.encode(text, add_special_tokens=False)),
        label=label,
        metadata=metadata,
    )


def load_prompt_samples(spec: str, config: DataConfig, tokenizer: PromptTokenizer) -> tuple[list[Sample], LoadReport]:
    """Samples for every usable row of ``spec``, in file order, and a report of what was dropped."""
    limit = config.rollout_max_prompt_len
    if limit is not None and limit <= 0:
        raise DataError(f"--rollout-max-prompt-len must be positive, got {limit}")
    rows = read_located_rows(spec)
    samples = [_sample_from_row(located, config, tokenizer) for located in rows]
    kept = [s for s in samples if limit is None or len(s.prompt_tokens) <= limit]
    report = LoadReport(
        num_rows=len(rows),
        num_kept=len(kept),
        num_dropped_too_long=len(samples) - len(kept),
        max_prompt_len=limit,
        longest_kept_len=max((len(s.prompt_tokens) for s in kept), default=0),
    )
    if not kept:
        shortest = min(len(s.prompt_tokens) for s in samples)
        raise DataError(
            f"{spec}: all {len(rows)} prompts are longer than --rollout-max-prompt-len={limit} tokens "
            f"(the shortest has {shortest}); raise the limit"
        )
    return kept, report
