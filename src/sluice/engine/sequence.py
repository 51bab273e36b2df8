"""A request inside the engine: its tokens, how many of them have K/V in the cache, and its pages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

from sluice.engine.clients.protocol import FinishReason, GenerateRequest, GenerateResult, TopLogprobs

# Stands in token_ids for a token sampled by a step whose results are not back yet (the overlapped GPU path
# launches step k+1 before reading step k's tokens). Only a sequence's last token is ever pending.
PENDING_TOKEN = -1

OnDone = Callable[["GenerateResult | BaseException"], None]
# new output ids, their logprobs, their top candidates (empty unless the request set top_logprobs_num) and the
# named ids' logprobs (empty unless it set token_ids_logprob)
OnUpdate = Callable[[list[int], list[float], list[TopLogprobs], list[list[float]]], None]
# the prompt logprobs, their top candidates and the named ids' logprobs, in GenerateResult's form
# (input_logprobs, input_top_logprobs, input_token_ids_logprobs)
OnInputLogprobs = Callable[[list["float | None"], list["TopLogprobs | None"], list["list[float] | None"]], None]


class SequenceState(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again (its K/V recomputed on return)
    RUNNING = "running"  # holds pages; prefilling in chunks or decoding one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerateRequest
    on_done: OnDone
    on_update: OnUpdate | None
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    pages: list[int] = field(default_factory=list)  # the pages holding token_ids, in order
    page_hashes: list[int] = field(default_factory=list)  # prefix-hash chain of the full pages of token_ids
    num_registered: int = 0  # leading pages entered into the prefix cache
    state: SequenceState = SequenceState.WAITING
    slot: int = -1  # row of the runner's block table while running
    num_table_pages: int = 0  # leading pages already written to that row
    output_logprobs: list[float] = field(default_factory=list)
    output_versions: list[int] = field(default_factory=list)  # weight version that sampled each output token
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per output token, if the request asked
    # first prompt position whose logprob is reported, -1: none (see GenerateRequest.logprob_start_len); the
    # positions after it are scored from the logits of the one before, in order, as prefill chunks compute them
    input_logprob_start: int = -1
    num_input_scored: int = 0  # prompt positions from input_logprob_start on launched for scoring
    input_logprobs: list[float] = field(default_factory=list)  # read back, for prompt tokens start+1, start+2, ...
    input_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # likewise, if top_logprobs_num is set
    input_token_ids_logprobs: list[list[float]] = field(default_factory=list)  # likewise, if token_ids_logprob is set
    output_token_ids_logprobs: list[list[float]] = field(default_factory=list)  # per output token, likewise
    num_reported: int = 0  # output tokens already passed to on_update
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False
    finishing: bool = False  # its pending token is its last (length limit): nothing more to schedule
    finish: FinishReason | None = None
    matched_stop: int | str | None = None
    text: str = ""
    on_input_logprobs: OnInputLogprobs | None = None  # called once, before the first on_update

    @property
    def rid(self) -> str:
        return self.request.rid

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_prefill_only(self) -> bool:
        """max_new_tokens 0: the prompt is computed (and scored, if asked) and nothing is sampled."""
        return self.request.sampling_params.max_new_tokens == 0

    @property
    def num_input_logprobs(self) -> int:
        """Prompt tokens scored from logits (the entry at the start itself is None, see GenerateResult)."""
        return max(0, self.num_prompt_tokens - 1 - self.input_logprob_start) if self.input_logprob_start >= 0 else 0

    @property
    def next_scored_position(self) -> int | None:
        """The next prompt position whose logits score the token after it; None when every one is launched."""
        if self.num_input_scored >= self.num_input_logprobs:
            return None
        return self.input_logprob_start + self.num_input_scored

    @property
    def cacheable_prefix_len(self) -> int:
        """How many leading tokens the prefix cache may serve: never the last (it is computed to sample from),
        nor, while prompt logprobs are still to be scored, anything past the first position to score (its logits
        are needed, and a cached page holds K/V only), as SGLang caps its radix match at logprob_start_len."""
        limit = len(self.token_ids) - 1
        position = self.next_scored_position
        return limit if position is None else min(limit, position)

    @property
    def has_pending_token(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] == PENDING_TOKEN
