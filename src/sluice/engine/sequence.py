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
# new output ids, their logprobs, and their top candidates (empty unless the request set top_logprobs_num)
OnUpdate = Callable[[list[int], list[float], list[TopLogprobs]], None]


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
    num_reported: int = 0  # output tokens already passed to on_update
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False
    finishing: bool = False  # its pending token is its last (length limit): nothing more to schedule
    finish: FinishReason | None = None
    matched_stop: int | str | None = None
    text: str = ""

    @property
    def rid(self) -> str:
        return self.request.rid

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def has_pending_token(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] == PENDING_TOKEN
