"""What every route of the HTTP server shares: the engine, its async face, names and the weight-update groups."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

import torch

from sluice.engine.clients.protocol import GenerateRequest, GenerateResult, TopLogprobs
from sluice.engine.server.async_engine import AsyncEngine
from sluice.engine.server.weight_staging import StagedUpdate
from sluice.engine.settings import EngineConfig
from sluice.net.auth import ApiKeys
from sluice.net.http_errors import RequestError
from sluice.types import SamplingParams
from sluice.weights.process_group import WeightGroup


RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait


def api_keys(config: EngineConfig) -> ApiKeys:
    return ApiKeys(config.api_key, config.admin_api_key)


class ServedEngine(Protocol):
    """All the server uses of a LocalEngine (the engine keeps this interface across rewrites)."""

    tokenizer: object  # None when started with --sglang-skip-tokenizer-init: token ids only
    model_config: object  # the Hugging Face config
    context_len: int
    weight_version: int

    def submit(self, request: GenerateRequest, on_done: Callable[[GenerateResult | BaseException], None],
               on_update: Callable[[list[int], list[float], list[TopLogprobs], list[list[float]]], None] | None = None,
               on_input_logprobs: Callable[[list, list, list], None] | None = None) -> None: ...
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
    def keys(self) -> ApiKeys:
        return api_keys(self.engine_config)

    @property
    def weight_roots(self) -> list[Path]:
        """Directories /update_weights_from_disk may load from: the model's parent and --sglang-weight-load-dirs."""
        extra = (Path(directory).resolve() for directory in self.engine_config.weight_load_dirs)
        roots = [Path(self.model_path).resolve().parent, *extra]
        return list(dict.fromkeys(roots))

    def check_weight_path(self, field: str, path: str) -> None:
        """Refuse (403, naming the allowed roots) a directory outside them; symbolic links are followed first."""
        resolved = Path(path).resolve()
        roots = self.weight_roots
        if not any(resolved.is_relative_to(root) for root in roots):
            raise RequestError(field, f"{path} is outside the directories this server loads weights from "
                                      f"({', '.join(map(str, roots))}); add one with --sglang-weight-load-dirs",
                               status=403)

    def check_batch_size(self, field: str, num_requests: int) -> None:
        limit = self.engine_config.max_prompts_per_request
        if num_requests > limit:
            raise RequestError(field, f"{num_requests} generations in one request; the limit is {limit} "
                                      "(--sglang-max-prompts-per-request)")

    def admit(self, num_requests: int) -> None:
        """Refuse with 503 and Retry-After when ``num_requests`` more would overfill the waiting queue."""
        limit = self.engine_config.max_queued_requests
        waiting = self.engine.load()["num_waiting"]
        if waiting + num_requests > limit:
            raise RequestError("", f"the engine's waiting queue is full ({waiting} waiting, limit {limit}, "
                                   "--sglang-max-queued-requests); retry later", status=503,
                               headers={"Retry-After": str(RETRY_AFTER_S)})

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
        if len(input_ids) >= self.context_len:  # SGLang's check and message: no room for one output token
            raise RequestError(field, f"The input ({len(input_ids)} tokens) is longer than the model's context "
                                      f"length ({self.context_len} tokens, --sglang-context-length).")
        limit = self.engine_config.max_prompt_tokens
        if limit is not None and len(input_ids) > limit:
            raise RequestError(field, f"{len(input_ids)} prompt tokens; the limit is {limit} "
                                      "(--sglang-max-prompt-tokens)")

    def encode(self, field: str, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError(field, "this server runs without a tokenizer (--sglang-skip-tokenizer-init): "
                                      "send token ids")
        return list(self.tokenizer.encode(text))

    def decode_token(self, token_id: int) -> str:
        """One token's text, for logprob entries; "" without a tokenizer."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def check_room(self, field: str, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse, naming ``field``, a token limit that the prompt leaves no room for, in SGLang's words. The
        engine can fill the whole context (prompt + output = context length), so that is allowed; SGLang's own
        check also refuses that equality."""
        total = num_prompt_tokens + max_new_tokens
        if total > self.context_len:
            raise RequestError(field, f"Requested token count exceeds the model's maximum context length of "
                                      f"{self.context_len} tokens. You requested a total of {total} tokens: "
                                      f"{num_prompt_tokens} tokens from the input messages and {max_new_tokens} "
                                      "tokens for the completion. Please reduce the number of tokens in the input "
                                      "messages or the completion to fit within the limit.")

    def check_top_logprobs(self, field: str, count: int) -> None:
        limit = self.engine_config.max_top_logprobs
        if count > limit:
            raise RequestError(field, f"{count} top logprobs per token requested; the limit is {limit} "
                                      "(--sglang-max-top-logprobs)")

    def make_request(self, field: str, input_ids: list[int], params: SamplingParams, return_logprob: bool,
                     rid: str | None = None, *, max_tokens_field: str, top_logprobs_num: int = 0,
                     top_logprobs_field: str = "", logprob_start_len: int = -1,
                     logprob_start_field: str = "logprob_start_len", token_ids_logprob: list[int] | None = None,
                     token_ids_field: str = "token_ids_logprob") -> GenerateRequest:
        """A checked request: the prompt, the room its ``max_new_tokens`` (given as ``max_tokens_field``) asks
        for, the top-logprob count against the server's limit, the first prompt position to score, and the ids
        whose logprobs are reported."""
        self.check_prompt(field, input_ids)
        self.check_room(max_tokens_field, len(input_ids), params.max_new_tokens)
        self.check_top_logprobs(top_logprobs_field, top_logprobs_num)
        if logprob_start_len >= len(input_ids):  # SGLang refuses it too (it aborts the request with 400)
            raise RequestError(logprob_start_field, f"logprob_start_len={logprob_start_len} is not less than the "
                                                    f"number of input tokens ({len(input_ids)}); use a smaller "
                                                    "logprob_start_len")
        if token_ids_logprob:
            self.check_token_ids(token_ids_field, token_ids_logprob)
        return GenerateRequest(list(input_ids), params, return_logprob=return_logprob, rid=rid or uuid.uuid4().hex,
                               top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len,
                               token_ids_logprob=list(token_ids_logprob) if token_ids_logprob else None)

    def check_token_ids(self, field: str, token_ids: list[int]) -> None:
        """Refuse, naming ``field``, ids outside the vocabulary, or more ids than --sglang-max-token-ids-logprob
        (each costs one float per reported position, and a list per scored prompt position)."""
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(field, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        limit = self.engine_config.max_token_ids_logprob
        if len(token_ids) > limit:
            raise RequestError(field, f"{len(token_ids)} token ids named; the limit is {limit} "
                                      "(--sglang-max-token-ids-logprob)")
