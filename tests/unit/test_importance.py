"""Off-policy correction weights (--use-tis --tis-mode): hand values on a 2x3 example, the overflow clamp,
detachment, and the effective sample size."""

from __future__ import annotations

import math

import pytest
import torch

from sluice import algorithms
from sluice.algorithms import effective_sample_size, importance_weight

# Row 0 has a masked-out last token with a wild log-ratio (7.0) that must not count anywhere.
OLD = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
ROLLOUT = [[-1.5, -0.4, -9.0], [-0.3, -0.2, -0.9]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
LOW, HIGH = 0.5, 1.5
# Log-ratios old - rollout of the trained tokens: row 0: 0.5, -0.1; row 1: 0.0, -1.0, 0.2.
E = math.exp
HAND = {
    # per token: e^0.5 = 1.65 -> 1.5 (clipped), e^-0.1; 1, e^-1 = 0.37 -> 0.5 (clipped), e^0.2
    "token": ([[1.5, E(-0.1)], [1.0, 0.5, E(0.2)]], [[1, 0], [0, 1, 0]]),
    # per sequence: e^(0.5 - 0.1) = 1.49 (inside); e^(0 - 1 + 0.2) = 0.45 -> 0.5 (clipped)
    "sequence": ([[E(0.4)] * 2, [0.5] * 3], [[0, 0], [1, 1, 1]]),
    # geometric: e^(0.4 / 2), e^(-0.8 / 3), both inside
    "geometric": ([[E(0.2)] * 2, [E(-0.8 / 3)] * 3], [[0, 0], [0, 0, 0]]),
    # icepop: ratio outside [0.5, 1.5] -> weight 0 (dropped), inside -> 1
    "icepop": ([[0.0, 1.0], [1.0, 0.0, 1.0]], [[1, 0], [0, 1, 0]]),
}


def trained(x: torch.Tensor) -> list[list[float]]:
    """The trained-token entries of a [2, 3] tensor, row by row."""
    return [x[0, :2].tolist(), x[1].tolist()]


def test_every_variant_is_registered():
    assert algorithms.names("importance") == sorted(HAND)


@pytest.mark.parametrize("mode", sorted(HAND))
def test_hand_values(mode):
    old = torch.tensor(OLD, requires_grad=True)
    weight, stats = importance_weight(mode, old, torch.tensor(ROLLOUT), torch.tensor(MASK), LOW, HIGH)
    expected_weight, expected_clipped = HAND[mode]
    assert weight.shape == (2, 3) and not weight.requires_grad
    for got, want in zip(trained(weight), expected_weight):
        assert got == pytest.approx(want, rel=1e-6)
    assert trained(stats["clipped"]) == [[float(c) for c in row] for row in expected_clipped]


@pytest.mark.parametrize("mode", sorted(HAND))
def test_a_huge_log_ratio_gives_a_finite_weight(mode):
    # 200 tokens of log-ratio +1: the sequence log-weight is 200, exp would overflow float32 (> 88).
    old, rollout, mask = torch.zeros(1, 200), torch.full((1, 200), -1.0), torch.ones(1, 200)
    weight, stats = importance_weight(mode, old, rollout, mask, LOW, HIGH)
    assert torch.isfinite(weight).all()
    expected = 0.0 if mode == "icepop" else HIGH
    assert torch.all(weight == expected) and torch.all(stats["clipped"] == 1.0)


def test_bfloat16_inputs_are_weighed_in_float32():
    weight, _ = importance_weight("sequence", torch.tensor(OLD, dtype=torch.bfloat16),
                                  torch.tensor(ROLLOUT, dtype=torch.bfloat16), torch.tensor(MASK), LOW, HIGH)
    assert weight.dtype == torch.float32


def test_effective_sample_size():
    mask = torch.tensor(MASK)
    assert effective_sample_size(torch.full((2, 3), 0.7), mask) == pytest.approx(1.0)
    # trained weights 1, 2 | 2, 4, 1 (the masked 100 does not count): 10^2 / (5 * 26)
    weight = torch.tensor([[1.0, 2.0, 100.0], [2.0, 4.0, 1.0]])
    assert effective_sample_size(weight, mask) == pytest.approx(100 / 130)
    one_carries_all = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert effective_sample_size(one_carries_all, mask) == pytest.approx(1 / 5)
    icepop_keeps_two = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert effective_sample_size(icepop_keeps_two, mask) == pytest.approx(2 / 5)
    assert effective_sample_size(torch.zeros(2, 3), mask) == 0.0  # every token dropped
    assert effective_sample_size(weight, torch.zeros(2, 3)) == 1.0  # nothing to correct
