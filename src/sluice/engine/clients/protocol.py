"""The Engine contract: token ids in, token ids + logprobs + finish reason + weight version out.

The same records are used by the in-process engine, the HTTP client and the router, so the rollout code is the
same whichever engine serves it.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import torch

from sluice.types import SamplingParams


class EngineUnavailable(ConnectionError):
    """The engine could not be reached, or went away while a request was in flight (its process died). The
    request did not finish; the rollout requeues its sample rather than failing it."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens or the model's context limit
    ABORT = "abort"  # aborted from outside; the output so far is returned


@dataclass
class TopLogprobs:
    """The most likely tokens at one output position, most likely first; ``logprobs`` follow the convention of
    ``GenerateResult.output_logprobs`` (log_softmax(logits / temperature), before top-p/top-k/min-p truncation), so
    the sampled token's entry, when it is among them, equals its output logprob."""

    token_ids: list[int]
    logprobs: list[float]  # descending


@dataclass
class GenerateRequest:
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = True
    # How many most likely tokens (and their logprobs) to report at each output position; 0: none, and no cost.
    top_logprobs_num: int = 0
    # First prompt position whose logprob is reported (``GenerateResult.input_logprobs``, SGLang's
    # ``logprob_start_len``); -1: SGLang's default, the last prompt token only (none when max_new_tokens is 0).
    # Needs return_logprob; positions from here on are recomputed even when the prefix cache holds them.
    logprob_start_len: int = -1
    # Token ids whose logprobs are reported at every output position (and every scored prompt position), in this
    # order, duplicates kept (SGLang's ``token_ids_logprob``); None: none, and no cost. Needs return_logprob.
    token_ids_logprob: list[int] | None = None
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Requests sharing a key (the samples of one GRPO group, the turns of one conversation) go to the same
    # engine behind a MultiEngineClient, so they share its prefix cache; None: route by the prompt's tokens.
    group_key: str | None = None


@dataclass
class GenerateResult:
    rid: str
    output_ids: list[int]  # generated tokens; a matched stop string's tokens are kept, its text trimmed
    output_logprobs: list[float]  # log p(token) under softmax(logits / temperature), before top-p/top-k
    finish_reason: FinishReason
    weight_version: int  # weight version when the request finished (the sync loop never updates mid-request)
    prompt_tokens: int
    text: str = ""  # decoded output, stop string trimmed
    matched_stop: int | str | None = None
    cached_tokens: int = 0
    # weight version that sampled each output token: a request that lives through a weight update (continuing
    # on the new weights) shows where the change happened; empty from engines that do not report it (HTTP)
    weight_versions: list[int] = field(default_factory=list)
    # one entry per output token when the request set top_logprobs_num, else empty
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # with return_logprob: one entry per prompt token from logprob_start_len on, log p(token | the tokens before
    # it) in the output logprobs' convention; the first entry is None, as in SGLang (its logits are those of the
    # position before the start, which the request does not compute: to score token k, start at k - 1)
    input_logprobs: list[float | None] = field(default_factory=list)
    # with top_logprobs_num too: the top candidates at each of those positions, the first None likewise
    input_top_logprobs: list[TopLogprobs | None] = field(default_factory=list)
    # with token_ids_logprob: per output token, the logprobs of those ids (in the request's order), in the
    # output logprobs' convention; empty when the request did not ask
    output_token_ids_logprobs: list[list[float]] = field(default_factory=list)
    # and per prompt position of input_logprobs, the same (the first None likewise)
    input_token_ids_logprobs: list[list[float] | None] = field(default_factory=list)


NamedTensors = Mapping[str, torch.Tensor]


class EngineClient(Protocol):
    """What the rollout needs from an engine; implemented in-process, over HTTP, and by a router."""

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def update_weights(self, weights: NamedTensors | str, version: int) -> None: ...

    async def abort(self, rid: str | None = None) -> None: ...  # None: abort all

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def weight_version(self) -> int: ...
