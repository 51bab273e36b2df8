"""What the engine must reproduce, from plain transformers forwards of the same checkpoint."""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding with full forwards (no cache, no padding), ignoring EOS."""
    out: list[int] = []
    for _ in range(num_tokens):
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1]
        out.append(int(logits.argmax()))
    return out


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], output: list[int], temperature: float = 1.0) -> list[float]:
    """log softmax(logits / temperature) of each output token, from one forward of prompt + output."""
    ids = torch.tensor([prompt + output])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, dim=-1)
    return [log_probs[len(prompt) - 1 + j, token].item() for j, token in enumerate(output)]


@torch.no_grad()
def hf_top_logprobs(model, prompt: list[int], output: list[int], count: int,
                    temperature: float = 1.0) -> list[tuple[list[int], list[float]]]:
    """At each output position, the ``count`` most likely tokens under log softmax(logits / temperature), most
    likely first, as (token ids, logprobs), from one forward of prompt + output."""
    ids = torch.tensor([prompt + output])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, dim=-1)
    values, tokens = log_probs[len(prompt) - 1 : len(prompt) - 1 + len(output)].topk(count, dim=-1)
    return [(t.tolist(), v.tolist()) for t, v in zip(tokens, values)]
