"""Logprobs of prompt tokens (SGLang's ``input_token_logprobs``), for requests that set a ``logprob_start_len``.

Which positions: a request starting at k reports prompt tokens k..n-1; token k's entry is None (SGLang's form),
and token q > k is scored from the logits at position q - 1. So the hidden states of positions k..n-2 are put
through the LM head, chunk by chunk as the prefill computes them. Those positions must be computed by this request:
the prefix cache serves at most the first k tokens (``Sequence.cacheable_prefix_len``), and a preempted request
that comes back skips the positions it has already scored.

Convention: that of the output logprobs (engine/sampler.py), log_softmax(logits / temperature) with greedy rows at
temperature 1, so a prompt scored by the same request's settings compares with its sampled tokens' logprobs. The
same log-probs give the top candidates (``top_logprobs_num``) and the named ids' values (``token_ids_logprob``,
read with one gather over the ids padded to the longest list) of the requests that ask.

Cost and memory: nothing for a batch where no request asks. Otherwise the rows are scored a slice at a time, so
at most ``MAX_SCORED_FLOATS`` float32 log-probs (256 MiB) exist at once, whatever the prompt's length; a 32k-token
prompt is never materialised as [32k, vocab]. The values travel to the host with the step's readback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sluice.device import to_device
from sluice.engine.clients.protocol import TopLogprobs
from sluice.engine.sampler import logprob_temperature
from sluice.engine.scheduler import ScheduledBatch
from sluice.engine.sequence import Sequence
from sluice.engine.token_ids_logprobs import padded_ids

MAX_SCORED_FLOATS = 64 * 2**20  # float32 log-probs alive at once while scoring prompt rows


@dataclass
class PromptRows:
    """The rows of one step whose logits score the next prompt token."""

    rows: list[int]  # packed index (into the step's hidden states) of each scored position
    targets: list[int]  # the prompt token after each of those positions
    seqs: list[Sequence]  # the sequences scored, in batch order
    counts: list[int]  # rows of each of those sequences, consecutive in ``rows``


def plan_prompt_rows(batch: ScheduledBatch) -> PromptRows | None:
    """The positions of ``batch`` to score, and each sequence's ``num_input_scored`` advanced past them; None when
    no sequence of the batch has prompt positions to score."""
    plan = PromptRows([], [], [], [])
    offset = 0  # packed index of the sequence's first new token
    for seq, count in zip(batch.seqs, batch.num_new_tokens):
        position, start = seq.next_scored_position, seq.num_computed
        if position is not None and position < start + count:
            if position < start:  # the cache served a position still to score: its logits are lost
                raise RuntimeError(f"request {seq.rid}: prompt position {position} to score lies in its cached "
                                   f"prefix ({start} tokens)")
            stop = min(start + count, seq.input_logprob_start + seq.num_input_logprobs)
            plan.rows += range(offset + position - start, offset + stop - start)
            plan.targets += seq.token_ids[position + 1 : stop + 1]
            plan.seqs.append(seq)
            plan.counts.append(stop - position)
            seq.num_input_scored += stop - position
        offset += count
    return plan if plan.rows else None


@dataclass
class PromptScores:
    """The scored rows' logprobs (and top candidates) of one step, on their way to the host."""

    plan: PromptRows
    logprobs: torch.Tensor  # [len(rows)] float32: log p(target)
    top_logprobs: torch.Tensor | None  # [len(rows), max top count] float32, descending; None when none asked
    top_ids: torch.Tensor | None  # [len(rows), max top count] int64
    named: torch.Tensor | None = None  # [len(rows), longest named-id list] float32; None when none asked
    event: "torch.cuda.Event | None" = None

    def to_host(self) -> "PromptScores":
        """Start the device-to-host copies and record an event after them (GPU); on CPU, nothing to do."""
        if self.logprobs.device.type == "cpu":
            return self
        move = (lambda t: t.to("cpu", non_blocking=True) if t is not None else None)
        scores = PromptScores(self.plan, move(self.logprobs), move(self.top_logprobs), move(self.top_ids),
                              move(self.named))
        scores.event = torch.cuda.Event()
        scores.event.record()
        return scores

    def deliver(self) -> None:
        """Wait for the copies, then append each sequence's values in order."""
        if self.event is not None:
            self.event.synchronize()
        values = self.logprobs.tolist()
        top_values = self.top_logprobs.tolist() if self.top_logprobs is not None else []
        top_ids = self.top_ids.tolist() if self.top_ids is not None else []
        named = self.named.tolist() if self.named is not None else []
        row = 0
        for seq, count in zip(self.plan.seqs, self.plan.counts):
            seq.input_logprobs += values[row : row + count]
            num_top = seq.request.top_logprobs_num
            if num_top:
                seq.input_top_logprobs += [TopLogprobs(top_ids[r][:num_top], top_values[r][:num_top])
                                           for r in range(row, row + count)]
            num_named = len(seq.request.token_ids_logprob or [])
            if num_named:
                seq.input_token_ids_logprobs += [named[r][:num_named] for r in range(row, row + count)]
            row += count


def score_prompt_rows(model, hidden: torch.Tensor, plan: PromptRows,
                      max_floats: int = MAX_SCORED_FLOATS) -> PromptScores:
    """hidden [packed tokens, hidden size] of the step -> the planned rows' logprobs, in slices of rows of at
    most ``max_floats`` log-probs each (one row at least)."""
    device = hidden.device
    vocab = int(model.config.vocab_size)
    index = to_device(plan.rows, torch.int64, device)
    targets = to_device(plan.targets, torch.int64, device)
    temperatures = [logprob_temperature(seq.request.sampling_params)
                    for seq, count in zip(plan.seqs, plan.counts) for _ in range(count)]
    scale = to_device(temperatures, torch.float32, device)
    num_top = max(seq.request.top_logprobs_num for seq in plan.seqs)
    num_rows = len(plan.rows)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)
    top_logprobs = torch.empty((num_rows, num_top), dtype=torch.float32, device=device) if num_top else None
    top_ids = torch.empty((num_rows, num_top), dtype=torch.int64, device=device) if num_top else None
    named_index = None
    if any(seq.request.token_ids_logprob for seq in plan.seqs):  # a list per scored row only when one asks
        named_index = padded_ids([seq.request.token_ids_logprob or [] for seq, count in zip(plan.seqs, plan.counts)
                                  for _ in range(count)], device)
    named = torch.empty(named_index.shape, dtype=torch.float32, device=device) if named_index is not None else None
    step = max(1, max_floats // vocab)
    for first in range(0, num_rows, step):
        last = min(first + step, num_rows)
        logits = model.compute_logits(hidden.index_select(0, index[first:last]))
        log_probs = torch.log_softmax(logits.float() / scale[first:last, None], dim=-1)
        logprobs[first:last] = log_probs.gather(1, targets[first:last, None]).squeeze(1)
        if num_top:
            top_logprobs[first:last], top_ids[first:last] = log_probs.topk(num_top, dim=-1)
        if named is not None:
            named[first:last] = log_probs.gather(1, named_index[first:last])
    return PromptScores(plan, logprobs, top_logprobs, top_ids, named)

