"""Turning rows of a prompt file into ``Sample`` records: pick keys, render chat templates, tokenize, filter.
With --response-key (SFT from data) each row is a finished sample: prompt, response and loss mask (``sft.py``).

Keys are dotted paths into nested rows (``key_path.py``), so verl's layout works as written: ``--input-key
prompt --label-key reward_model.ground_truth --metadata-key extra_info``, and its ``data_source`` column reaches
reward functions as ``sample.metadata["data_source"]`` (``--data-source-key``).

All row problems are ``DataError`` naming the file, line (or row) and key, raised at load time, so a bad
dataset fails before any GPU work starts rather than hours later when the bad row comes up in a batch.
Prompts over ``--rollout-max-prompt-len`` are dropped and counted in a ``LoadReport``, never silently.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

from sluice.config.sections import DataConfig
from sluice.data.chat_messages import check_messages
from sluice.data.files import DataError, LocatedRow, iter_located_rows
from sluice.data.key_path import MissingKey, find, lookup
from sluice.data.sft import sft_tokens
from sluice.types import Sample, Status

DATA_SOURCE = "data_source"  # the metadata key of a row's --data-source-key value


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


def required_key(located: LocatedRow, path: str, flag: str) -> Any:
    """The value at the key path ``path`` (set by ``flag``); a missing part names the row, flag and level."""
    try:
        return lookup(located.row, path)
    except MissingKey as missing:
        raise DataError(f"{located.where}: missing key {path!r} (set by {flag}); {missing.detail}") from None


def render_prompt(located: LocatedRow, prompt: Any, config: DataConfig, tokenizer: PromptTokenizer) -> str:
    """The text the engine sees: the chat-templated prompt, or the raw string without --apply-chat-template."""
    key, where = config.input_key, located.where
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = check_messages(where, key, prompt)
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


def _metadata(located: LocatedRow, config: DataConfig) -> dict[str, Any]:
    """The row's metadata (a copy), with its data source under ``data_source`` for rewards that dispatch on it."""
    # None counts as absent: parquet fills a column missing from some rows with nulls.
    raw = find(located.row, config.metadata_key)
    if raw is not None and not isinstance(raw, dict):
        raise DataError(
            f"{located.where}: {config.metadata_key!r} (--metadata-key) must be an object, got {type(raw).__name__}"
        )
    metadata = copy.deepcopy(raw) if raw else {}
    source = find(located.row, config.data_source_key) if config.data_source_key else None
    if source is not None:
        metadata[DATA_SOURCE] = source
    return metadata


def _label(located: LocatedRow, config: DataConfig, text_reward: str | None) -> Any:
    """The row's label; a text reward (``text_reward``, its --rm-type) needs a string or number, since an object
    or array would be compared as its Python text (``"{'a': 1}"``), which a response can match exactly."""
    label = required_key(located, config.label_key, "--label-key")
    if text_reward is not None and isinstance(label, (dict, list)):
        kind = "object" if isinstance(label, dict) else "array"
        raise DataError(
            f"{located.where}: label {config.label_key!r} (--label-key) is a JSON {kind} "
            f"({type(label).__name__}); --rm-type {text_reward} compares text, so give a string or number "
            "(e.g. a nested key such as --label-key reward_model.ground_truth), or score it with --custom-rm-path"
        )
    return label


def _sft_sample(located: LocatedRow, prompt: Any, label: Any, metadata: dict[str, Any], config: DataConfig,
                tokenizer: PromptTokenizer) -> Sample:
    """A finished sample of SFT data (--response-key): the response is the row's, not generated."""
    response = required_key(located, config.response_key, "--response-key")
    tokens = sft_tokens(located.where, prompt, response, input_key=config.input_key,
                        response_key=config.response_key, apply_chat_template=config.apply_chat_template,
                        template_kwargs=config.apply_chat_template_kwargs, tokenizer=tokenizer)
    metadata["prompt_text"] = tokens.prompt_text
    return Sample(prompt=copy.deepcopy(prompt), prompt_tokens=tokens.prompt_ids,
                  tokens=tokens.prompt_ids + tokens.response_ids, response=tokens.response_text,
                  response_length=len(tokens.response_ids), loss_mask=tokens.loss_mask, label=copy.deepcopy(label),
                  status=Status.COMPLETED, metadata=metadata)


def _sample_from_row(located: LocatedRow, config: DataConfig, tokenizer: PromptTokenizer,
                     text_reward: str | None) -> Sample:
    prompt = required_key(located, config.input_key, "--input-key")
    label = _label(located, config, text_reward) if config.label_key else None
    metadata = _metadata(located, config)
    if config.response_key is not None:
        return _sft_sample(located, prompt, label, metadata, config, tokenizer)
    text = render_prompt(located, prompt, config, tokenizer)
    metadata["prompt_text"] = text
    return Sample(
        prompt=copy.deepcopy(prompt),
        prompt_tokens=list(tokenizer.encode(text, add_special_tokens=False)),
        label=copy.deepcopy(label),
        metadata=metadata,
    )


def check_first_row(spec: str, config: DataConfig, *, text_reward: str | None = None) -> None:
    """Fail fast on a wrong path or key: open ``spec`` and look up the configured keys in its first row only.

    Cheap for every container (one row is read), so it runs before the tokenizer and models load.
    ``text_reward``: the --rm-type that compares labels as text, if any (then a label must be a string or number).
    """
    located = next(iter_located_rows(spec))
    required_key(located, config.input_key, "--input-key")
    if config.response_key is not None:
        required_key(located, config.response_key, "--response-key")
    if config.label_key:
        _label(located, config, text_reward)


def load_prompt_samples(spec: str, config: DataConfig, tokenizer: PromptTokenizer, *,
                        text_reward: str | None = None) -> tuple[list[Sample], LoadReport]:
    """Samples for every usable row of ``spec``, in file order, and a report of what was dropped.

    ``text_reward``: as for ``check_first_row``.
    """
    limit = config.rollout_max_prompt_len
    if limit is not None and limit <= 0:
        raise DataError(f"--rollout-max-prompt-len must be positive, got {limit}")
    samples = [_sample_from_row(located, config, tokenizer, text_reward) for located in iter_located_rows(spec)]
    kept = [s for s in samples if limit is None or len(s.prompt_tokens) <= limit]
    report = LoadReport(
        num_rows=len(samples),
        num_kept=len(kept),
        num_dropped_too_long=len(samples) - len(kept),
        max_prompt_len=limit,
        longest_kept_len=max((len(s.prompt_tokens) for s in kept), default=0),
    )
    if not kept:
        shortest = min(len(s.prompt_tokens) for s in samples)
        raise DataError(
            f"{spec}: all {len(samples)} prompts are longer than --rollout-max-prompt-len={limit} tokens "
            f"(the shortest has {shortest}); raise the limit"
        )
    return kept, report
