"""Skip optimizer steps with a NaN or infinite loss or gradient, and stop a run that keeps producing them.

One bad batch (a NaN reward, an overflow in a long sequence) should not poison the weights: its step is
skipped, gradients are dropped and the optimizer moments and LR schedule stay where they were. Many bad steps
in a row mean the run has diverged (weights already non-finite, a broken reward); training on would only burn
compute, so the run stops with a message saying what to look at.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger("sluice.trainer")


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class NonFiniteGuard:
    """Decides whether an optimizer step is applied; counts the skipped ones (saved with checkpoints)."""

    max_consecutive: int  # --max-consecutive-nonfinite-steps; 0: never stop
    num_consecutive: int = 0  # skipped steps since the last applied one
    num_skipped: int = 0  # skipped steps in the whole run

    def accept(self, loss: float, grad_norm: float) -> bool:
        """True when the step may be applied; False (with a warning) to skip it.

        Raises NonFiniteTraining on the ``max_consecutive``-th skipped step in a row.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.num_consecutive = 0
            return True
        self.num_consecutive += 1
        self.num_skipped += 1
        limit = self.max_consecutive
        if limit and self.num_consecutive >= limit:
            raise NonFiniteTraining(
                f"stopping: {self.num_consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"(last: loss={loss}, grad_norm={grad_norm}; --max-consecutive-nonfinite-steps {limit}). "
                "Look for NaN/inf rewards or weights, or lower --lr; the last checkpoint holds the weights from "
                "before the bad steps.")
        log.warning("skipped an optimizer step: loss=%s, grad_norm=%s (%d in a row%s)", loss, grad_norm,
                    self.num_consecutive, f", the run stops at {limit}" if limit else "")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"num_consecutive": self.num_consecutive, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_consecutive, self.num_skipped = state["num_consecutive"], state["num_skipped"]
