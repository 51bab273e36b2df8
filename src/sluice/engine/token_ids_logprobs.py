"""Logprobs of token ids a request names (SGLang's ``token_ids_logprob``), at each position it samples.

Convention: that of the sampled token's logprob and the top candidates (engine/sampler.py, top_logprobs.py):
log_softmax(logits / temperature) before top-p / top-k / min-p truncation, greedy rows at temperature 1. So a
named id that is sampled reports its output logprob, and one among the top candidates the same value there.

Only the rows that ask are touched: their logits are gathered, scaled and log-softmaxed, and the named ids read
from one ``gather`` over a [rows, longest list] index padded with id 0 (the padding is cut on the host). A batch
where no request asks costs nothing. The results travel to the host with the step's sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sluice.device import to_device
from sluice.engine.sampler import logprob_temperature
from sluice.types import SamplingParams


@dataclass
class NamedTokenLogprobs:
    """The logprobs of the named ids of the rows of one step that asked for them."""

    rows: list[int]  # indices into the step's sampled rows
    counts: list[int]  # how many ids each of those rows named
    logprobs: torch.Tensor  # [len(rows), max(counts)] float32, row i's first counts[i] entries in its ids' order

    def to_host(self) -> "NamedTokenLogprobs":
        """Start the device-to-host copy; the step's readback event is recorded after it."""
        if self.logprobs.device.type == "cpu":
            return self
        return NamedTokenLogprobs(self.rows, self.counts, self.logprobs.to("cpu", non_blocking=True))

    def by_row(self) -> dict[int, list[float]]:
        """Each asking row's values, cut to its own count (call once the copy is done)."""
        values = self.logprobs.tolist()
        return {row: values[i][:count] for i, (row, count) in enumerate(zip(self.rows, self.counts))}


def padded_ids(id_lists: list[list[int]], device: torch.device) -> torch.Tensor:
    """[len(id_lists), longest] int64, each list padded with id 0 (a valid index whose values are cut later)."""
    width = max(len(ids) for ids in id_lists)
    return to_device([ids + [0] * (width - len(ids)) for ids in id_lists], torch.int64, device)


def token_ids_logprobs(logits: torch.Tensor, params: list[SamplingParams],
                       token_ids: list[list[int] | None]) -> NamedTokenLogprobs | None:
    """logits [B, V] (one row per sampled sequence), each row's settings and named ids (None: none) -> the
    asking rows' logprobs of those ids; None when no row asks."""
    rows = [i for i, ids in enumerate(token_ids) if ids]
    if not rows:
        return None
    index = to_device(rows, torch.int64, logits.device)
    scale = to_device([logprob_temperature(params[i]) for i in rows], torch.float32, logits.device)
    log_probs = torch.log_softmax(logits.index_select(0, index).float() / scale[:, None], dim=-1)
    values = log_probs.gather(1, padded_ids([token_ids[i] for i in rows], logits.device))
    return NamedTokenLogprobs(rows, [len(token_ids[i]) for i in rows], values)
