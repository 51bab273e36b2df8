"""A two-sequence batch with hand-computed PPO losses per trained token (masked positions hold wild values)."""

from __future__ import annotations

import math

import torch

from sluice.types import TrainBatch

# Two sequences, three target positions each. Masked positions hold wild values that must not matter.
LOSS_MASK = [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
LOG_PROBS = [[-5.0, -1.0, -0.6], [-1.3, -0.7, -9.0]]
OLD_LOG_PROBS = [[-1.0, -1.1, -1.0], [-1.0, -0.7, -0.1]]
ADVANTAGES = [[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]]  # broadcast per sequence, as GRPO does
REF_LOG_PROBS = [[-2.0, -1.2, -0.5], [-1.0, -1.0, -3.0]]
ENTROPY = [[9.0, 2.0, 1.5], [1.0, 0.5, 9.0]]

# The four trained tokens, by hand (eps_clip 0.2, eps_clip_high 0.28: ratio range [0.8, 1.28]):
#   a: log-ratio  0.1, A=+1:   r = e^0.1  = 1.1052 inside the range -> loss -A*r     = -e^0.1
#   b: log-ratio  0.4, A=+1:   r = e^0.4  = 1.4918 > 1.28, clipped  -> loss -A*1.28  = -1.28
#   c: log-ratio -0.3, A=-0.5: r = e^-0.3 = 0.7408 < 0.8;  max(0.5*0.7408, 0.5*0.8) -> 0.4 (clipped)
#   d: log-ratio  0.0, A=-0.5: r = 1                                                 -> 0.5
PG_A, PG_B, PG_C, PG_D = -math.exp(0.1), -1.28, 0.5 * 0.8, 0.5 * 1.0
NUM_TOKENS = 4


def hand_batch(with_ref: bool = False) -> tuple[TrainBatch, torch.Tensor]:
    batch = TrainBatch(
        input_ids=torch.zeros((2, 4), dtype=torch.long),
        attention_mask=torch.ones((2, 4), dtype=torch.long),
        loss_mask=torch.tensor(LOSS_MASK),
        advantages=torch.tensor(ADVANTAGES),
        rollout_log_probs=torch.zeros((2, 3)),
        old_log_probs=torch.tensor(OLD_LOG_PROBS),
        ref_log_probs=torch.tensor(REF_LOG_PROBS) if with_ref else None,
    )
    return batch, torch.tensor(LOG_PROBS, requires_grad=True)
