"""Supervised fine-tuning loss: per-token negative log-likelihood of the target tokens.

Kept per token (``[B, T]``) so it is reduced by the same ``aggregate`` contract as the RL losses; with
``token_mean`` over the global token count this is the usual cross-entropy of the optimizer step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sft_nll(log_probs: Tensor) -> Tensor:
    """``-log_probs`` (log-probs of the target tokens, float32 or wider); mask it via ``aggregate``."""
    return -log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))
