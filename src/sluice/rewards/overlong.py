"""DAPO's soft overlong punishment: a linear reward penalty over the last ``buffer_len`` tokens of the budget.

For a response of ``n`` tokens under a budget of ``M`` (--rollout-max-response-len) and a buffer ``L``
(--overlong-buffer-len), the penalty is 0 while ``n <= M - L`` and falls linearly to ``-P`` at ``n = M``
(``P``: --overlong-penalty-factor). It is added to float rewards only: a dict reward has no single scalar
to shift, so it is left as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.types import Sample, Status


def overlong_penalty(response_length: int, max_response_len: int, buffer_len: int, penalty_factor: float) -> float:
    """``-P * (n - (M - L)) / L`` past the buffer start ``M - L``, else 0; ``-P`` at ``n = M``."""
    excess = response_length - (max_response_len - buffer_len)
    if excess <= 0:
        return 0.0
    return -penalty_factor * min(excess, buffer_len) / buffer_len


@dataclass(frozen=True)
class OverlongShaping:
    max_response_len: int  # M: the generation budget of the rollout
    buffer_len: int  # L: penalised tokens at the end of the budget, 0 < L < M
    penalty_factor: float  # P >= 0: the penalty at n = M

    def apply(self, samples: list[Sample]) -> None:
        """Add the penalty to each scored float reward; record it in ``metadata['overlong_penalty']``."""
        for sample in samples:
            if sample.status == Status.FAILED or not isinstance(sample.reward, (int, float)):
                continue
            penalty = overlong_penalty(sample.response_length, self.max_response_len, self.buffer_len,
                                       self.penalty_factor)
            sample.reward = float(sample.reward) + penalty
            sample.metadata["overlong_penalty"] = penalty
