"""Per-token logprobs (and entropy) of a causal LM, matching the engine's sampling distribution."""

from __future__ import annotations

import torch

from sluice.algorithms import entropy_from_logits, log_probs_from_logits


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature) of each next token: [B, T-1], and its entropy [B, T-1] if asked.

    Dividing by the rollout temperature makes these the logprobs of the distribution the engine sampled
    from (before top-p/top-k), so importance ratios against the rollout logprobs are meaningful.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature  # once, shared by the logprobs and the entropy
    selected = log_probs_from_logits(logits, input_ids[:, 1:])
    entropy = entropy_from_logits(logits) if with_entropy else None
    return selected, entropy
