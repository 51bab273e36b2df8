"""Continuous batching: which sequences run in the next forward pass, and how many tokens each.

Every step has a token budget. Running sequences go first, in admission order: a decoding sequence takes one
token, a sequence still prefilling takes its next chunk. Waiting sequences are then admitted first-in first-out
while budget, pages and the running limit allow; a long prompt is prefilled in chunks across steps.

When a running sequence needs a page and none is free, the most recently admitted running sequence is preempted:
its pages are released and it goes back to the front of the queue, its K/V to be recomputed (its tokens so far
are kept, and its cached prefix pages are often still there to be revived). Preempting the newest and requeueing
at the front means the oldest requests always make progress: nothing starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sluice.engine.block_manager import BlockManager
from sluice.engine.sequence import Sequence, SequenceState


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens of each sequence computed in this step

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running_requests: int, max_batched_tokens: int):
        if max_batched_tokens < max_running_requests:
            raise ValueError(
                f"the token budget per step ({max_batched_tokens}) must be >= the most running requests "
                f"({max_running_requests}) so every running sequence can decode each step"
            )
        self.blocks = blocks
        self.max_running_requests = max_running_requests
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_running_requests - 1, -1, -1))  # block-table rows for running sequences
        self.min_admission = max(1, max_running_requests // 8)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = ScheduledBatch([], [])
        budget = self._schedule_running(batch, self.max_batched_tokens)
        self._admit_waiting(batch, budget)
        return batch if batch.seqs else None

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        blocks = self.blocks
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.finishing:  # its last token is being sampled: it retires when that step's results are read
                index += 1
                continue
            count = min(len(seq.token_ids) - seq.num_computed, budget)
            if blocks.pages_needed(seq, count):
                while blocks.pages_needed(seq, count) > blocks.num_free and self.running[-1] is not seq:
                    self.preempt(self.running[-1])
                if blocks.pages_needed(seq, count) > blocks.num_free:
                    self.preempt(seq)  # it was the newest: it waits for the others to free pages
                    continue
                blocks.reserve(seq, count)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(count)
            budget -= count
            index += 1
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        if self.running and not self._worth_admitting():
            return
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            seq = self.waiting[0]
            if seq.has_pending_token:  # preempted while its token was being sampled: back once that token is read
                break
            prefix, blocked = self.blocks.match_prefix(seq)
            if blocked:  # another sequence is computing this prompt's next page: wait one step and share it
                skipped.append(self.waiting.popleft())
                continue
            uncomputed = len(seq.token_ids) - len(prefix) * self.blocks.page_size
            count = min(uncomputed, budget)
            needed = -(-(len(prefix) * self.blocks.page_size + count) // self.blocks.page_size) - len(prefix)
            revived = sum(1 for page in prefix if self.blocks.refcount[page] == 0)
            if needed + revived > self.blocks.num_free:
                break
            self.waiting.popleft()
            self.blocks.admit(seq, prefix)
            if not seq.admitted_once:
                seq.cached_tokens = seq.num_computed
                seq.admitted_once = True
            self.blocks.reserve(seq, count)
            seq.state = SequenceState.RUNNING
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(count)
            budget -= count
        self.waiting.extendleft(reversed(skipped))

    def _worth_admitting(self) -> bool:
        """Admit in batches: a step that prefills new sequences runs eagerly (no CUDA graph), so while others
        decode, wait until an eighth of the running slots (or every waiting sequence) can come in at once.
        Decode steps are then graph replays almost always; the queue stays first-in first-out."""
        free = self.max_running_requests - len(self.running)
        return free >= min(self.min_admission, len(self.waiting))

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._leave(seq)
        seq.state = SequenceState.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence, running or still waiting."""
        if seq.state == SequenceState.RUNNING:
            self.running.remove(seq)
            self._leave(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.state = SequenceState.FINISHED

    def _leave(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        self.free_slots.append(seq.slot)
        seq.slot, seq.num_table_pages = -1, 0
