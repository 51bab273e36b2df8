"""The most likely tokens at each sampled position, for requests that ask (``GenerateRequest.top_logprobs_num``).

Convention: the same as the sampled token's logprob (engine/sampler.py): log_softmax(logits / temperature), taken
before top-p / top-k / min-p truncation, at temperature 1 for greedy rows. So the sampled token's entry, when it is
among the top, equals its reported logprob, and the values are those a trainer computes. Others differ: vLLM by
default (``--logprobs-mode raw_logprobs``) reports the raw logits' log-softmax, before temperature; SGLang takes
them after temperature (before it with ``SGLANG_RETURN_ORIGINAL_LOGPROB``); OpenAI documents no convention.

Only the rows that asked are touched: their logits are gathered, scaled and log-softmaxed again (the sampler's
fused kernel never materialises the full log-probs), and one ``topk`` runs at the largest count asked for. A batch
where no request asks costs nothing. The results travel to the host with the step's sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sluice.device import to_device
from sluice.engine.clients.protocol import TopLogprobs
from sluice.engine.sampler import logprob_temperature
from sluice.types import SamplingParams


@dataclass
class TopCandidates:
    """The top tokens of the rows of one step that asked for them."""

    rows: list[int]  # indices into the step's sampled rows
    counts: list[int]  # how many each of those rows asked for
    logprobs: torch.Tensor  # [len(rows), max(counts)] float32, descending along each row
    token_ids: torch.Tensor  # [len(rows), max(counts)] int64

    def to_host(self) -> "TopCandidates":
        """Start the device-to-host copies (into pinned memory, so they do not wait); the step's readback event
        is recorded after them."""
        if self.logprobs.device.type == "cpu":
            return self
        return TopCandidates(self.rows, self.counts, self.logprobs.to("cpu", non_blocking=True),
                             self.token_ids.to("cpu", non_blocking=True))

    def by_row(self) -> dict[int, TopLogprobs]:
        """Each asking row's entry, cut to its own count (call once the copies are done)."""
        values, ids = self.logprobs.tolist(), self.token_ids.tolist()
        return {row: TopLogprobs(ids[i][:count], values[i][:count])
                for i, (row, count) in enumerate(zip(self.rows, self.counts))}


def top_logprobs(logits: torch.Tensor, params: list[SamplingParams], counts: list[int]) -> TopCandidates | None:
    """logits [B, V] (one row per sampled sequence), each row's settings and top count -> the asking rows' top
    ``count`` tokens by logprob; None when no row asks."""
    rows = [i for i, count in enumerate(counts) if count > 0]
    if not rows:
        return None
    index = to_device(rows, torch.int64, logits.device)
    temperatures = [logprob_temperature(params[i]) for i in rows]
    scale = to_device(temperatures, torch.float32, logits.device)
    log_probs = torch.log_softmax(logits.index_select(0, index).float() / scale[:, None], dim=-1)
    values, ids = log_probs.topk(max(counts), dim=-1)  # sorted, largest first
    return TopCandidates(rows, [counts[i] for i in rows], values, ids)
