"""Prompt-token logprobs through `sluice serve`'s /generate (SGLang's ``logprob_start_len`` ->
``meta_info.input_token_logprobs``, with ``top_logprobs_num`` ``input_top_logprobs``), and prefill-only requests
(``max_new_tokens`` 0), and the OpenAI completions echo of a prompt, plain and streamed. Values are checked
against a transformers forward of the same checkpoint (CPU, float32)."""

from __future__ import annotations

import json

import pytest

from helpers.reference import hf_prompt_logprobs

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

PROMPT = [(5 * i + 2) % 90 + 6 for i in range(40)]  # 40 tokens: more than two 16-token pages


def scoring(prompt, start, max_new_tokens=2, **extra) -> dict:
    return {"input_ids": prompt, "return_logprob": True, "logprob_start_len": start,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}, **extra}


def assert_reference(meta, hf_model, prompt, start, top=0):
    values, tops = hf_prompt_logprobs(hf_model, prompt, start, top)
    entries = meta["input_token_logprobs"]
    assert [entry[1] for entry in entries] == prompt[start:]
    assert entries[0][0] is None
    assert [entry[0] for entry in entries[1:]] == pytest.approx(values, abs=1e-4)
    if top:
        assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(prompt) - start
        for got, (ids, logprobs) in zip(meta["input_top_logprobs"][1:], tops):
            assert [entry[1] for entry in got] == ids
            assert [entry[0] for entry in got] == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize("start", [0, 1, 20, 39])
def test_input_token_logprobs_match_the_reference(http, hf_lively, start):
    meta = http.post("/generate", json=scoring(PROMPT, start)).json()["meta_info"]
    assert_reference(meta, hf_lively, PROMPT, start)
    assert len(meta["output_token_logprobs"]) == 2


def test_a_warm_prefix_cache_changes_no_value(http, engine, hf_lively):
    engine.flush_cache()
    first = http.post("/generate", json=scoring(PROMPT, 0, top_logprobs_num=3)).json()["meta_info"]
    again = http.post("/generate", json=scoring(PROMPT, 0, top_logprobs_num=3)).json()["meta_info"]
    assert again["input_token_logprobs"] == first["input_token_logprobs"]
    assert again["input_top_logprobs"] == first["input_top_logprobs"]
    assert again["cached_tokens"] == 0
    sharing = PROMPT[:36] + [7, 8, 9]  # shares two full pages with PROMPT
    meta = http.post("/generate", json=scoring(sharing, 34)).json()["meta_info"]
    assert meta["cached_tokens"] == 32  # the pages before the start come from the cache
    assert_reference(meta, hf_lively, sharing, 34)
    assert_reference(again, hf_lively, PROMPT, 0, top=3)


def test_prefill_only_scores_a_prompt_without_generating(http, engine, hf_lively):
    body = scoring(PROMPT, 0, max_new_tokens=0, top_logprobs_num=2, return_text_in_logprobs=True)
    reply = http.post("/generate", json=body).json()
    meta = reply["meta_info"]
    assert reply["output_ids"] == [] and reply["text"] == ""
    assert meta["finish_reason"] == {"type": "length", "matched": None, "length": 0}
    assert meta["output_token_logprobs"] == [] and meta["output_top_logprobs"] == []
    assert_reference(meta, hf_lively, PROMPT, 0, top=2)
    assert [entry[2] for entry in meta["input_token_logprobs"]] == [engine.tokenizer.decode([t]) for t in PROMPT]
    default = http.post("/generate", json={**body, "logprob_start_len": -1}).json()["meta_info"]
    assert default["input_token_logprobs"] == [] and default["input_top_logprobs"] == []


def test_the_default_start_reports_the_last_prompt_token(http):
    meta = http.post("/generate", json=scoring(PROMPT, -1, top_logprobs_num=1)).json()["meta_info"]
    assert meta["input_token_logprobs"] == [[None, PROMPT[-1], None]] and meta["input_top_logprobs"] == [None]


def test_a_batch_scores_each_prompt_from_its_own_start(http, hf_lively):
    prompts = [PROMPT[:10], PROMPT[5:30]]
    body = {"input_ids": prompts, "return_logprob": True, "logprob_start_len": [0, 3],
            "sampling_params": {"temperature": 0, "max_new_tokens": 0}}
    outputs = http.post("/generate", json=body).json()
    assert_reference(outputs[0]["meta_info"], hf_lively, prompts[0], 0)
    assert_reference(outputs[1]["meta_info"], hf_lively, prompts[1], 3)


def test_every_chunk_of_a_stream_carries_the_input_logprobs(http):
    """As in SGLang's (non-incremental) stream: the prompt's logprobs from the first chunk on."""
    body = scoring(PROMPT, 4, max_new_tokens=3, top_logprobs_num=2)
    plain = http.post("/generate", json=body).json()["meta_info"]
    with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert len(chunks) == 4  # three tokens, then the complete response
    for chunk in chunks:
        assert chunk["meta_info"]["input_token_logprobs"] == plain["input_token_logprobs"]
        assert chunk["meta_info"]["input_top_logprobs"] == plain["input_top_logprobs"]


# ----------------------------------------------------------------------------------------------- OpenAI echo
def test_completions_echo_scores_the_prompt_with_the_openai_client(server, engine, hf_lively):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    text = "reverse 12345 please"
    ids = engine.tokenizer.encode(text)
    reply = client.completions.create(model="lively", prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice = reply.choices[0]
    values, tops = hf_prompt_logprobs(hf_lively, ids, 0, 2)
    assert choice.text == text and choice.finish_reason == "length" and reply.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [engine.tokenizer.decode([t]) for t in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(values, abs=1e-4)
    for top, (top_ids, logprobs), piece in zip(choice.logprobs.top_logprobs[1:], tops, choice.logprobs.tokens[1:]):
        expected = dict(zip((engine.tokenizer.decode([t]) for t in top_ids), logprobs))
        assert set(expected) <= set(top) and piece in top
        assert [top[key] for key in expected] == pytest.approx(list(expected.values()), abs=1e-4)
    generated = client.completions.create(model="lively", prompt=text, max_tokens=3, echo=True, logprobs=0,
                                          temperature=0, extra_body={"ignore_eos": True})
    choice = generated.choices[0]
    assert len(choice.logprobs.tokens) == len(ids) + 3 and choice.text.startswith(text)
    assert choice.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(values, abs=1e-4)


def test_completions_echo_without_logprobs(http):
    reply = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "echo": True}).json()
    assert reply["choices"][0]["text"].startswith("hi") and reply["choices"][0]["logprobs"] is None


def streamed_choices(http, body: dict) -> dict[int, list[dict]]:
    """The chunks of a streamed /v1/completions call, by choice index."""
    choices: dict[int, list[dict]] = {}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    choices.setdefault(choice["index"], []).append(choice)
    return choices


def joined_logprobs(chunks: list[dict]) -> dict:
    """The logprobs of a choice's chunks, concatenated list by list."""
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for key in joined:
            joined[key] += (chunk["logprobs"] or {}).get(key, [])
    return joined


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 5}])
@pytest.mark.parametrize("logprobs", [None, 0, 2])
def test_a_streamed_echo_equals_the_plain_one(http, engine, hf_lively, sampling, logprobs):
    text = "reverse 12345 please"
    body = {"prompt": text, "max_tokens": 4, "echo": True, "ignore_eos": True, "logprobs": logprobs, **sampling}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    chunks = streamed_choices(http, body)[0]
    assert chunks[0]["text"].startswith(text)
    assert "".join(chunk["text"] for chunk in chunks) == plain["text"]
    assert sum((chunk["token_ids"] for chunk in chunks), []) == plain["token_ids"]
    assert chunks[-1]["finish_reason"] == plain["finish_reason"] == "length"
    if logprobs is None:
        assert all(chunk["logprobs"] is None for chunk in chunks)
        return
    joined = joined_logprobs(chunks)
    expected = plain["logprobs"]
    ids = engine.tokenizer.encode(text)
    assert joined["tokens"] == expected["tokens"] and len(joined["tokens"]) == len(ids) + 4
    assert joined["text_offset"] == expected["text_offset"]
    assert joined["token_logprobs"][0] is None and joined["top_logprobs"][0] is None
    assert joined["token_logprobs"][1:] == pytest.approx(expected["token_logprobs"][1:], abs=1e-5)
    values, _ = hf_prompt_logprobs(hf_lively, ids, 0, temperature=sampling["temperature"] or 1.0)
    assert joined["token_logprobs"][1 : len(ids)] == pytest.approx(values, abs=1e-4)
    for streamed, reference in zip(joined["top_logprobs"][1:], expected["top_logprobs"][1:]):
        assert streamed.keys() == reference.keys()
        assert list(streamed.values()) == pytest.approx(list(reference.values()), abs=1e-5)


def test_a_streamed_echo_of_each_choice_and_of_a_scored_prompt(http, engine):
    body = {"prompt": ["hi", "ok then"], "n": 2, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0.7,
            "seed": 1, "ignore_eos": True}
    plain = http.post("/v1/completions", json=body).json()["choices"]
    streamed = streamed_choices(http, body)
    assert sorted(streamed) == [0, 1, 2, 3]
    for index, chunks in streamed.items():
        assert chunks[0]["text"].startswith(["hi", "ok then"][index // 2])
        assert "".join(chunk["text"] for chunk in chunks) == plain[index]["text"]
        assert joined_logprobs(chunks)["tokens"] == plain[index]["logprobs"]["tokens"]
    scored = {"prompt": "reverse 12345 please", "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
    plain = http.post("/v1/completions", json=scored).json()["choices"][0]
    chunks = streamed_choices(http, scored)[0]
    assert len(chunks) == 1 and chunks[0]["text"] == plain["text"] == scored["prompt"]
    assert chunks[0]["finish_reason"] == "length" and chunks[0]["token_ids"] == []
    joined = joined_logprobs(chunks)
    assert joined["tokens"] == plain["logprobs"]["tokens"]
    assert joined["token_logprobs"][0] is None
    assert joined["token_logprobs"][1:] == pytest.approx(plain["logprobs"]["token_logprobs"][1:], abs=1e-5)
