"""engine/top_logprobs.py against log_softmax computed by hand, row by row."""

from __future__ import annotations

import math

import pytest
import torch

from sluice.engine.top_logprobs import top_logprobs
from sluice.types import SamplingParams


def hand_log_softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_total = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - log_total for x in scaled]


def test_only_asking_rows_get_their_own_count_at_their_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5],
                           [0.0, 0.0, 0.0, 0.0, 0.0],
                           [2.0, -2.0, 4.0, 1.0, 3.5]], dtype=torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.5, top_p=0.3, top_k=1)]
    top = top_logprobs(logits, params, [2, 0, 4])
    assert top.rows == [0, 2] and top.counts == [2, 4]
    by_row = top.to_host().by_row()
    assert set(by_row) == {0, 2}
    for row, count, temperature in ((0, 2, 1.0), (2, 4, 0.5)):  # greedy rows at temperature 1; truncation ignored
        reference = hand_log_softmax(logits[row].float().tolist(), temperature)
        order = sorted(range(5), key=lambda t: -reference[t])[:count]
        assert by_row[row].token_ids == order
        assert by_row[row].logprobs == pytest.approx([reference[t] for t in order], abs=1e-6)


def test_no_asking_row_costs_nothing():
    params = [SamplingParams(), SamplingParams()]
    assert top_logprobs(torch.zeros(2, 7), params, [0, 0]) is None
