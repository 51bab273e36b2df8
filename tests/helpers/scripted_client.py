"""An engine client that replays scripted texts (a tiny random model writes no tool calls), and the text of a
tool call."""

from __future__ import annotations

import json

from sluice.engine.clients.protocol import FinishReason, GenerateRequest, GenerateResult


class ScriptedClient:
    """An engine client that 'generates' the given texts in turn (each followed by EOS), with made-up logprobs."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts, self.requests = tokenizer, list(texts), []

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.requests.append(request)
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer.encode(self.texts.pop(0), add_special_tokens=False) + [eos]
        ids = ids[: request.sampling_params.max_new_tokens]
        stopped = ids[-1] == eos
        logprobs = [-0.01 * (k + 1) for k in range(len(ids))]
        finish = FinishReason.STOP if stopped else FinishReason.LENGTH
        return GenerateResult(f"r{len(self.requests)}", ids, logprobs, finish, weight_version=7,
                              prompt_tokens=len(request.input_ids),
                              text=self.tokenizer.decode(ids, skip_special_tokens=True),
                              matched_stop=eos if stopped else None)


def call(expression: str, name: str = "calculator") -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": {"expression": expression}}) + "</tool_call>"
