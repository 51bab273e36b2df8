"""Out-of-range requests to `sluice serve`'s generation routes: each is refused with 400 in the API's error format,
naming the offending field, the limit and the value asked for, and the server keeps serving. The engine is the
real one on the tiny lively checkpoint (CPU), whose context length is 512 tokens."""

from __future__ import annotations

import openai
import pytest


CONTEXT_LEN = 512
CHAT = [{"role": "user", "content": "hi"}]


def test_the_engine_context_is_what_these_cases_assume(engine):
    assert engine.context_len == CONTEXT_LEN


def native(params: dict | None = None, **extra) -> dict:
    return {"input_ids": [5, 6, 7], "sampling_params": params or {}, **extra}


# (route, body, the field named in "param", substrings of the message: the limit and the value asked for)
OUT_OF_RANGE = [
    ("/generate", native({"max_new_tokens": 10**12}), "sampling_params.max_new_tokens",
     ["maximum context length of 512 tokens", "1000000000003 tokens", "3 tokens from the input", "1000000000000"]),
    ("/generate", native({"max_new_tokens": 510}), "sampling_params.max_new_tokens", ["512", "513 tokens"]),
    ("/generate", {"input_ids": [[5], [5, 6]], "sampling_params": [{"max_new_tokens": 4}, {"max_new_tokens": 511}]},
     "sampling_params[1].max_new_tokens", ["512", "513 tokens"]),
    ("/generate", {"input_ids": [5] * 512}, "input_ids", ["The input (512 tokens)", "context length (512 tokens"]),
    ("/generate", native({"max_new_tokens": -5}), "sampling_params.max_new_tokens", ["greater than or equal to 0"]),
    ("/generate", native({"temperature": -0.1}), "sampling_params.temperature", ["greater than or equal to 0"]),
    ("/generate", native({"top_p": 0.0}), "sampling_params.top_p", ["greater than 0"]),
    ("/generate", native({"top_p": 1.5}), "sampling_params.top_p", ["less than or equal to 1"]),
    ("/generate", native({"top_k": -2}), "sampling_params.top_k", ["-1 (no cut) or at least 1"]),
    ("/generate", native({"min_p": 1.5}), "sampling_params.min_p", ["less than or equal to 1"]),
    ("/generate", native({"n": 2}), "sampling_params.n", ["only 1"]),
    ("/generate", native({"sampling_seed": 2**64}), "sampling_params.sampling_seed", ["9223372036854775807"]),
    ("/generate", native(return_logprob=True, top_logprobs_num=21), "top_logprobs_num",
     ["21 top logprobs", "limit is 20", "--sglang-max-top-logprobs"]),
    ("/generate", native(return_logprob=True, top_logprobs_num=-1), "top_logprobs_num", [">= 0, got -1"]),
    ("/generate", native(top_logprobs_num=2), "top_logprobs_num", ["return_logprob"]),
    ("/generate", native(return_logprob=True, logprob_start_len=3), "logprob_start_len",
     ["logprob_start_len=3", "number of input tokens (3)"]),
    ("/generate", native(return_logprob=True, logprob_start_len=-2), "logprob_start_len", ["-1 (the default)", "-2"]),
    ("/generate", native(logprob_start_len=0), "logprob_start_len", ["return_logprob"]),
    ("/generate", {"input_ids": [[5, 6], [5, 6, 7]], "return_logprob": True, "logprob_start_len": [1, 7]},
     "logprob_start_len[1]", ["logprob_start_len=7", "number of input tokens (3)"]),
    ("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 600}, "max_tokens",
     ["maximum context length of 512 tokens", "603 tokens", "600 tokens for the completion"]),
    ("/v1/completions", {"prompt": [5] * 600}, "prompt", ["The input (600 tokens)", "(512 tokens"]),
    ("/v1/completions", {"prompt": [5] * 500}, "max_tokens", ["516 tokens", "16 tokens for the completion"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens", ["greater than or equal to 0"]),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", ["limit is 20"]),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs", ["greater than or equal to 0"]),
    ("/v1/completions", {"prompt": "hi", "n": 129}, "n", ["less than or equal to 128"]),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature", ["greater than or equal to 0"]),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, "top_p", ["less than or equal to 1"]),
    ("/v1/completions", {"prompt": "hi", "top_k": 0}, "top_k", ["-1 (no cut) or at least 1"]),
    ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1}, "seed", ["-9223372036854775808"]),
    ("/v1/completions", {"prompt": "hi", "seed": 2**63 - 1, "n": 2}, "seed", ["seed + n - 1", "9223372036854775807"]),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
     ["only allowed with stream true"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1000}, "max_tokens",
     ["maximum context length of 512 tokens", "1000 tokens for the completion"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 1000, "max_tokens": 4},
     "max_completion_tokens", ["1000 tokens for the completion"]),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     ["limit is 20"]),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs", ["top_logprobs: needs logprobs true"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens",
     ["greater than or equal to 1"]),
]


@pytest.mark.parametrize("path, body, param, needles", OUT_OF_RANGE)
def test_out_of_range_requests_get_400_naming_the_limit(http, path, body, param, needles):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]  # OpenAI's shape; SGLang's {"error": {"message"}} is its subset
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["param"] == param
    for needle in needles:
        assert needle in error["message"], (needle, error["message"])
    assert http.post("/generate", json=native({"max_new_tokens": 2})).status_code == 200


@pytest.mark.parametrize("raw", ['{"input_ids": [5], "sampling_params": {"temperature": NaN}}',
                                 '{"input_ids": [5], "sampling_params": {"top_p": Infinity}}'])
def test_nan_and_infinity_are_refused(http, raw):
    """Python's JSON reader takes NaN and Infinity, and NaN passes no bound check: refused by name."""
    response = http.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("sampling_params.")


def test_a_limit_that_fills_the_context_exactly_is_served(http):
    """The engine fills the whole context: prompt + max tokens = context length is allowed, and ends by length."""
    body = native({"max_new_tokens": CONTEXT_LEN - 500, "ignore_eos": True})
    body["input_ids"] = [5] * 500
    reply = http.post("/generate", json=body).json()
    assert reply["meta_info"]["finish_reason"]["type"] == "length" and len(reply["output_ids"]) == 12


def test_the_default_limit_is_not_held_against_a_long_prompt(http):
    """As in SGLang, only a max_new_tokens the client gave is checked: the default (128) ends at the context."""
    reply = http.post("/generate", json={"input_ids": [5] * 500, "sampling_params": {"ignore_eos": True}}).json()
    assert reply["meta_info"]["finish_reason"]["type"] == "length" and len(reply["output_ids"]) == 12
    short = http.post("/generate", json={"input_ids": [5] * 3, "sampling_params": {"ignore_eos": True}}).json()
    assert len(short["output_ids"]) == 128


def test_the_openai_client_raises_bad_request_with_the_message(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length of 512 tokens") as refused:
        client.completions.create(model="lively", prompt="hi", max_tokens=10**6)
    assert refused.value.status_code == 400 and refused.value.param == "max_tokens"
