"""engine/token_ids_logprobs.py against log_softmax computed by hand, row by row."""

from __future__ import annotations

import math

import pytest
import torch

from sluice.engine.token_ids_logprobs import token_ids_logprobs
from sluice.types import SamplingParams


def hand_log_softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_total = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - log_total for x in scaled]


def test_only_asking_rows_get_their_own_ids_in_order_at_their_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5],
                           [0.0, 0.0, 0.0, 0.0, 0.0],
                           [2.0, -2.0, 4.0, 1.0, 3.5]], dtype=torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.5, top_p=0.3, top_k=1)]
    named = token_ids_logprobs(logits, params, [[4, 0, 4], None, [1]])
    assert named.rows == [0, 2] and named.counts == [3, 1]
    by_row = named.to_host().by_row()
    assert set(by_row) == {0, 2}
    for row, ids, temperature in ((0, [4, 0, 4], 1.0), (2, [1], 0.5)):  # greedy at temperature 1; no truncation
        reference = hand_log_softmax(logits[row].float().tolist(), temperature)
        assert by_row[row] == pytest.approx([reference[t] for t in ids], abs=1e-6)


def test_no_asking_row_costs_nothing():
    params = [SamplingParams(), SamplingParams()]
    assert token_ids_logprobs(torch.zeros(2, 7), params, [None, []]) is None
