"""What every route of the HTTP server shares: the engine, its async face, names and the weight-update groups."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import torch

from sluice.engine.clients.protocol import GenerateRequest, GenerateResult
from sluice.engine.server.async_engine import AsyncEngine
from sluice.engine.server.weight_staging import StagedUpdate
from sluice.engine.settings import EngineConfig
from sluice.net.http_errors import RequestError
from sluice.types import SamplingParams
from sluice.weights.process_group import WeightGroup


class ServedEngine(Protocol):
    """All the server uses of a LocalEngine (the engine keeps this interface across rewrites)."""

    tokenizer: object  # None when started with --sglang-skip-tokenizer-init: token ids only
    model_config: object  # the Hugging Face config
    context_len: int
    weight_version: int

    def submit(self, request: GenerateRequest, on_done: Callable[[GenerateResult | BaseException], None],
               on_update: Callable[[list[int], list[float]], None] | None = None) -> None: ...
    def abort(self, rid: str | None = None) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def update_weights(self, weights: Mapping[str, torch.Tensor] | str, version: int,
                       checksums: Mapping[str, int] | None = None) -> int: ...
    def weight_checksums(self) -> tuple[int, dict[str, int]]: ...
    def flush_cache(self) -> bool: ...
    def release_memory(self) -> None: ...
    def resume_memory(self) -> None: ...
    def load(self) -> dict: ...  # num_running, num_waiting, num_tokens
    def shutdown(self) -> None: ...


@dataclass
class ServerContext:
    engine: ServedEngine
    model_path: str
    served_model_name: str
    engine_config: EngineConfig
    host: str = "127.0.0.1"
    port: int = 0
    weight_groups: dict[str, WeightGroup] = field(default_factory=dict)  # by group_name
    # Buckets of a version being received over several calls, by group_name; applied at the last bucket.
    staged_updates: dict[str, StagedUpdate] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.async_engine = AsyncEngine(self.engine)
        # Serializes weight updates: two broadcasts into one group must not interleave their tensors.
        self.weights_lock = asyncio.Lock()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_config.vocab_size)

    @property
    def context_len(self) -> int:
        return int(self.engine.context_len)

    def check_prompt(self, field: str, input_ids: list[int]) -> None:
        """Refuse, naming ``field``, a prompt the engine cannot run: empty, unknown token ids, or too long."""
        if not input_ids:
            raise RequestError(field, "the prompt is empty")
        bad = next((t for t in input_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(field, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(input_ids) >= self.context_len:
            raise RequestError(field, f"{len(input_ids)} prompt tokens leave no room in the context length "
                                      f"{self.context_len}")

    def encode(self, field: str, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError(field, "this server runs without a tokenizer (--sglang-skip-tokenizer-init): "
                                      "send token ids")
        return list(self.tokenizer.encode(text))

    def decode_token(self, token_id: int) -> str:
        """One token's text, for logprob entries; "" without a tokenizer."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def make_request(self, field: str, input_ids: list[int], params: SamplingParams, return_logprob: bool,
                     rid: str | None = None) -> GenerateRequest:
        """A checked request; a ``max_new_tokens`` past the context length ends with finish reason length."""
        self.check_prompt(field, input_ids)
        return GenerateRequest(list(input_ids), params, return_logprob=return_logprob, rid=rid or uuid.uuid4().hex)
