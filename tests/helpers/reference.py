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


@torch.no_grad()
def hf_prompt_logprobs(model, prompt: list[int], start: int, count: int = 0,
                       temperature: float = 1.0) -> tuple[list[float], list[tuple[list[int], list[float]]]]:
    """For prompt tokens start+1 .. n-1: log softmax(logits / temperature) of each token given those before it,
    and the ``count`` most likely tokens there (ids, logprobs), from one forward of the prompt."""
    log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float() / temperature, dim=-1)
    rows = range(start, len(prompt) - 1)
    values = [log_probs[p, prompt[p + 1]].item() for p in rows]
    tops = []
    if count:
        top_values, top_ids = log_probs[start : len(prompt) - 1].topk(count, dim=-1)
        tops = [(i.tolist(), v.tolist()) for i, v in zip(top_ids, top_values)]
    return values, tops


@torch.no_grad()
def hf_token_ids_logprobs(model, tokens: list[int], positions: range, token_ids: list[int],
                          temperature: float = 1.0) -> list[list[float]]:
    """At each of ``positions`` of one forward of ``tokens``: log softmax(logits / temperature) of ``token_ids``
    (in their order), the distribution of the token after that position."""
    log_probs = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].float() / temperature, dim=-1)
    return [log_probs[p, token_ids].tolist() for p in positions]
