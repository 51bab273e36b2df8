"""``--data-source-path``: a user prompt source in place of ``PromptSource``.

Contract: a factory (a function or a class) ``make(prompts: list[Sample], seed: int)`` returning an object with
``next_batch(n) -> list[Sample]``; optional ``state_dict() -> dict`` / ``load_state_dict(state)`` (saved with
checkpoints, so a resumed run continues where it was) and ``__len__`` (prompts per epoch, for --num-epoch).
``prompts`` are the rows of --prompt-data ([] without it). A sample without ``prompt_tokens`` is tokenized by
sluice (chat template per --apply-chat-template).

slime's data source class ``Cls(args)`` with ``get_samples(n) -> list[list[Sample]]`` (groups; the first sample of
each is the prompt), and optionally ``save(rollout_id)`` / ``load(rollout_id)``, is told apart by its
``get_samples`` method.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

from sluice.config.sections import DataConfig
from sluice.plugins import Contract, PluginSignatureError, check_form, resolve
from sluice.types import Sample

FLAG = "--data-source-path"
CONTRACT = Contract(FLAG, "make(prompts: list[Sample], seed: int) -> object with next_batch(n)", 2,
                    "class with __init__(self, args) and get_samples(n)", 1, sync_only=True, is_class=True)


class SlimeSourceAdapter:
    """A slime data source as ``next_batch``: one prompt per group it hands out."""

    def __init__(self, source: Any):
        self.source = source

    def next_batch(self, n: int) -> list[Sample]:
        groups = self.source.get_samples(n)
        return [_as_sample(group[0] if isinstance(group, (list, tuple)) else group) for group in groups]

    def state_dict(self) -> dict[str, Any]:
        return {}  # slime sources save themselves (save(rollout_id)) into --save

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __len__(self) -> int:
        return len(self.source)


def _as_sample(item: Any) -> Sample:
    if isinstance(item, Sample):
        return copy.deepcopy(item)
    return Sample(prompt=copy.deepcopy(item.prompt), label=copy.deepcopy(getattr(item, "label", None)),
                  metadata=copy.deepcopy(dict(getattr(item, "metadata", None) or {})))


class TokenizingSource:
    """Fills in ``prompt_tokens`` of samples a custom source hands out without them."""

    def __init__(self, source: Any, data: DataConfig, tokenizer: Any):
        self.source, self.data, self.tokenizer = source, data, tokenizer

    def next_batch(self, n: int) -> list[Sample]:
        batch = self.source.next_batch(n)
        if not isinstance(batch, list) or len(batch) != n or not all(isinstance(s, Sample) for s in batch):
            raise TypeError(f"{FLAG}: next_batch({n}) must return a list of {n} Samples, got {_describe(batch)}")
        for sample in batch:
            if not sample.prompt_tokens:
                sample.prompt_tokens = self._tokenize(sample.prompt)
        return batch

    def _tokenize(self, prompt: str | list[dict[str, Any]]) -> list[int]:
        if self.data.apply_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **self.data.apply_chat_template_kwargs)
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise TypeError(f"{FLAG}: a prompt of chat messages needs --apply-chat-template")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict() if hasattr(self.source, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state)

    def num_rollouts_for_epochs(self, num_epoch: int, batch_size: int) -> int:
        if not hasattr(self.source, "__len__"):
            raise TypeError(f"{FLAG}: the source has no __len__, so --num-epoch cannot be counted; set --num-rollout")
        return -(-num_epoch * len(self.source) // batch_size)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} ({', '.join(sorted({type(v).__name__ for v in value}))})"
    return type(value).__name__


DataSourceFactory = Callable[[list[Sample], int, DataConfig, Any, Any], TokenizingSource]


def load_data_source(path: str) -> DataSourceFactory:
    """Check the source at ``path`` now (errors name the flag, the path and the expected form); the returned
    factory ``(prompts, seed, data_config, tokenizer, slime_args)`` builds it once the tokenizer is loaded."""
    factory = resolve(path, FLAG)
    slime_class = inspect.isclass(factory) and hasattr(factory, "get_samples") and not hasattr(factory, "next_batch")
    plugin = check_form(factory, CONTRACT, path)
    if plugin.slime_form and not slime_class:
        raise PluginSignatureError(f"{FLAG} {path!r}: takes one argument but has no get_samples(n) (slime's "
                                   f"form); expected {CONTRACT.expected()}")

    def build(prompts: list[Sample], seed: int, data: DataConfig, tokenizer: Any, slime_args: Any = None):
        source = SlimeSourceAdapter(factory(slime_args)) if slime_class else factory(prompts, seed)
        if not callable(getattr(source, "next_batch", None)):
            raise PluginSignatureError(f"{FLAG} {path!r}: made a {type(source).__name__} without next_batch(n); "
                                       f"expected {CONTRACT.expected()}")
        return TokenizingSource(source, data, tokenizer)

    return build
