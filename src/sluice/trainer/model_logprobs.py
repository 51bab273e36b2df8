"""Per-token logprobs (and entropy) of a causal LM, matching the engine's sampling distribution."""

from __future__ import annotations

import torch

from sluice.algorithms import entropy_from_logits, log_probs_from_logits
from sluice.trainer.packing import pack_rows


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature) of each next token: [B, T-1], and its entropy [B, T-1] if asked.

    Dividing by the rollout temperature makes these the logprobs of the distribution the engine sampled
    from (before top-p/top-k), so importance ratios against the rollout logprobs are meaningful.
    ``packed`` runs the rows as one packed row (see packing.py); the outputs have the same padded layout,
    with 0 past each row's end.
    """
    if packed:
        packing = pack_rows(input_ids, attention_mask)
        logits = model(input_ids=packing.input_ids, position_ids=packing.position_ids, attention_mask=None,
                       use_cache=False).logits[0, :-1]
        targets = packing.input_ids[0, 1:]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        targets = input_ids[:, 1:]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature  # once, shared by the logprobs and the entropy
    selected = log_probs_from_logits(logits, targets)
    entropy = entropy_from_logits(logits) if with_entropy else None
    if packed:
        selected = packing.unpack(selected)
        entropy = packing.unpack(entropy) if entropy is not None else None
    return selected, entropy
