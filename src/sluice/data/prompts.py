"""Turning rows of a prompt file into ``Sample`` records: pick keys, render chat templates, tokenize, filter.
With --response-key (SFT from data) each row is a finished sample: prompt, response and loss mask (``sft.py``).

Keys are dotted paths into nested rows (``key_path.py``), so verl's layout works as written: ``--input-key
prompt --label-key reward_model.ground_truth --metadata-key extra_info``, and its ``data_source`` column reaches
reward functions as ``sample.metadata["data_source"]`` (``--data-source-key``).

``sample_from_row`` is the one conversion of a row into a ``Sample``: whole files (``load_prompt_samples``, for
eval sets, --data-source-path and training sets small enough to convert at start) and the training prompts of a
large set, converted as they are drawn (``prompt_table.py``), both go through it, and through ``PromptChecks``.
Every row problem is a ``DataError`` naming the file, line (or row) and key. Each tokenized prompt is checked on
its own (``prompt_checks.py``): a prompt longer than the model's context allows is an error, unless
``--rollout-max-prompt-len`` asks to drop such prompts (then they are counted in the ``LoadReport``, never
silently); characters the tokenizer cannot represent are an error too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sluice.config.sections import DataConfig
from sluice.data.chat_messages import check_messages
from sluice.data.files import DataError, LocatedRow, iter_located_rows
from sluice.data.key_path import MissingKey, find, lookup
from sluice.data.prompt_checks import CharacterCheck, PromptLimit, check_prompt
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
    num_lossy: int = 0  # prompts that lost characters to the tokenizer (loaded only with --allow-lossy-prompts)
    first_lossy: str = ""  # where the first of them is, and its lost characters

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
    if text_reward is not None and label is None:  # parquet's null for a row without the column, or JSON null
        raise DataError(f"{located.where}: label {config.label_key!r} (--label-key) is null; --rm-type "
                        f"{text_reward} compares every response with a label, so give each row one")
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


def sample_from_row(located: LocatedRow, config: DataConfig, tokenizer: PromptTokenizer,
                    text_reward: str | None) -> Sample:
    """The prompt sample of one row: keys looked up, chat template rendered, tokenized; ``text_reward`` as for
    ``check_first_row``. Raises ``DataError`` naming the row's place for any problem."""
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


def prompt_limit(config: DataConfig, context_limit: PromptLimit | None) -> PromptLimit | None:
    """--rollout-max-prompt-len where set (longer prompts are dropped), else what the model's context leaves a
    prompt (a longer one is an error); None: no limit known."""
    flag = config.rollout_max_prompt_len
    return PromptLimit.from_flag(flag) if flag is not None else context_limit


class PromptChecks:
    """The per-prompt checks (``prompt_checks.check_prompt``) of one dataset, with what they counted: the same
    for a dataset converted whole and for one converted as batches draw it."""

    def __init__(self, config: DataConfig, tokenizer: PromptTokenizer, context_limit: PromptLimit | None) -> None:
        self.limit = prompt_limit(config, context_limit)
        self.characters = CharacterCheck(tokenizer, config.allow_lossy_prompts)
        self.num_lossy = 0  # prompts that lost characters (loaded only with --allow-lossy-prompts)
        self.first_lossy = ""

    @property
    def max_prompt_len(self) -> int | None:
        """The limit past which prompts are dropped (--rollout-max-prompt-len); None: none are dropped."""
        return self.limit.max_len if self.limit is not None and self.limit.drops_longer else None

    def keeps(self, located: LocatedRow, sample: Sample) -> bool:
        """False for a prompt over the dropping limit; raises DataError for one that must not load."""
        # an SFT sample arrives finished (response_length > 0): its whole sequence must fit, not the prompt alone
        tokens = sample.tokens if sample.response_length else sample.prompt_tokens
        finding = check_prompt(located.where, sample.metadata["prompt_text"], tokens, self.limit, self.characters)
        if finding.lost_characters:
            self.num_lossy += 1
            self.first_lossy = self.first_lossy or f"{located.where} ({finding.lost_characters})"
        return not finding.too_long

    def convert_all(self, spec: str, rows: Iterable[LocatedRow],
                    convert: Callable[[LocatedRow], Sample]) -> tuple[list[Sample | None], LoadReport]:
        """Every row converted and checked, in order: its sample, or None where the length limit drops it; and the
        report of the whole conversion (an error when nothing is kept)."""
        samples: list[Sample | None] = []
        kept: list[Sample] = []
        dropped_lens: list[int] = []
        for located in rows:
            sample = convert(located)
            if self.keeps(located, sample):
                kept.append(sample)
                samples.append(sample)
            else:
                dropped_lens.append(len(sample.prompt_tokens))
                samples.append(None)
        return samples, self.report(spec, kept, dropped_lens)

    def report(self, spec: str, kept: list[Sample], dropped_lens: list[int]) -> LoadReport:
        """The report of a whole dataset's conversion; an error when the length limit keeps no prompt."""
        if not kept:
            shortest = min(dropped_lens, default=0)
            raise DataError(f"{spec}: all {len(dropped_lens)} prompts are longer than --rollout-max-prompt-len="
                            f"{self.max_prompt_len} tokens (the shortest has {shortest}); raise the limit")
        return LoadReport(num_rows=len(kept) + len(dropped_lens), num_kept=len(kept),
                          num_dropped_too_long=len(dropped_lens), max_prompt_len=self.max_prompt_len,
                          longest_kept_len=max(len(s.prompt_tokens) for s in kept), num_lossy=self.num_lossy,
                          first_lossy=self.first_lossy)


def load_prompt_samples(spec: str, config: DataConfig, tokenizer: PromptTokenizer, *,
                        text_reward: str | None = None,
                        context_limit: PromptLimit | None = None) -> tuple[list[Sample], LoadReport]:
    """Samples for every usable row of ``spec``, in file order, and a report of what was dropped.

    All of them, converted now: for eval sets (every eval uses every prompt) and --data-source-path (whose
    factory takes the list); training prompts go through ``prompt_table.py``. ``text_reward``: as for
    ``check_first_row``. ``context_limit``: the most tokens the model's context leaves a prompt (see
    ``prompt_limit``).
    """
    checks = PromptChecks(config, tokenizer, context_limit)
    samples, report = checks.convert_all(
        spec, iter_located_rows(spec), lambda located: sample_from_row(located, config, tokenizer, text_reward))
    return [sample for sample in samples if sample is not None], report
