"""Top-k logprobs through `sluice serve`: SGLang's /generate (``top_logprobs_num`` -> ``meta_info.output_top_logprobs``)
and the OpenAI routes (completions ``logprobs=N``, chat ``top_logprobs``), read with the official openai client;
and the logprobs of named token ids (/generate's ``token_ids_logprob`` -> ``meta_info.output_token_ids_logprobs``
and ``input_token_ids_logprobs``). Every value is checked against a transformers forward of the same checkpoint
(CPU, float32)."""

from __future__ import annotations

import json

import openai
import pytest

from helpers.reference import hf_prompt_logprobs, hf_token_ids_logprobs, hf_top_logprobs

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


def chat_prompt(engine, messages) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def assert_matches_reference(tops: list[list], reference, sampled: list[list]) -> None:
    """``tops``: SGLang's per-position triples; ``sampled``: output_token_logprobs triples of the same positions."""
    assert len(tops) == len(reference) == len(sampled)
    for top, (ids, logprobs), (sampled_logprob, sampled_id, _) in zip(tops, reference, sampled):
        assert [entry[1] for entry in top] == ids
        assert [entry[0] for entry in top] == pytest.approx(logprobs, abs=1e-4)
        assert [entry[0] for entry in top] == sorted((entry[0] for entry in top), reverse=True)
        if sampled_id in ids:
            assert top[ids.index(sampled_id)][0] == pytest.approx(sampled_logprob, abs=1e-6)


# ----------------------------------------------------------------------------------------------- native
def test_generate_returns_the_top_logprobs_greedy_and_sampled(http, engine, hf_lively):
    ids = engine.tokenizer.encode("what is 2+2?")
    for params, temperature in (({"temperature": 0}, 1.0), ({"temperature": 0.8, "sampling_seed": 4}, 0.8)):
        body = {"input_ids": ids, "return_logprob": True, "top_logprobs_num": 5, "return_text_in_logprobs": True,
                "sampling_params": {"max_new_tokens": 6, "ignore_eos": True, **params}}
        meta = http.post("/generate", json=body).json()["meta_info"]
        output = [entry[1] for entry in meta["output_token_logprobs"]]
        reference = hf_top_logprobs(hf_lively, ids, output, 5, temperature)
        assert_matches_reference(meta["output_top_logprobs"], reference, meta["output_token_logprobs"])
        texts = [entry[2] for top in meta["output_top_logprobs"] for entry in top]
        assert texts == [engine.tokenizer.decode([entry[1]]) for top in meta["output_top_logprobs"] for entry in top]
        if temperature == 1.0:  # greedy: the sampled token is the first candidate
            assert output == [top[0][1] for top in meta["output_top_logprobs"]]


def test_each_prompt_of_a_batch_gets_its_own_count(http, engine):
    prompts = [engine.tokenizer.encode(p) for p in ("hi", "reverse 12345 please", "ok")]
    body = {"input_ids": prompts, "return_logprob": True, "top_logprobs_num": [1, 3, 0],
            "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}}
    outputs = http.post("/generate", json=body).json()
    assert [len(top) for top in outputs[0]["meta_info"]["output_top_logprobs"]] == [1] * 4
    assert [len(top) for top in outputs[1]["meta_info"]["output_top_logprobs"]] == [3] * 4
    assert "output_top_logprobs" not in outputs[2]["meta_info"]
    assert all(entry[2] is None for top in outputs[1]["meta_info"]["output_top_logprobs"] for entry in top)


def test_a_stream_carries_the_top_logprobs_so_far(http, engine):
    body = {"input_ids": engine.tokenizer.encode("hi"), "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}}
    plain = http.post("/generate", json=body).json()["meta_info"]["output_top_logprobs"]
    with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    partial = [chunk["meta_info"]["output_top_logprobs"] for chunk in chunks]
    assert [len(tops) for tops in partial[:-1]] == [1, 2, 3, 4, 5] and partial[-1] == plain
    assert all(plain[: len(tops)] == tops for tops in partial)


# ------------------------------------------------------------------------------------- named token ids
def test_generate_returns_the_named_token_ids_logprobs_greedy_and_sampled(http, engine, hf_lively):
    ids = engine.tokenizer.encode("reverse 12345 please")
    for params, temperature in (({"temperature": 0}, 1.0), ({"temperature": 0.8, "sampling_seed": 3}, 0.8)):
        greedy = http.post("/generate", json={"input_ids": ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": 1}}).json()["output_ids"]
        named = [7, greedy[0], 0, 7, 41]  # duplicates kept, in the request's order, as SGLang does
        body = {"input_ids": ids, "return_logprob": True, "token_ids_logprob": named, "logprob_start_len": 1,
                "top_logprobs_num": 3, "return_text_in_logprobs": True,
                "sampling_params": {"max_new_tokens": 5, "ignore_eos": True, **params}}
        meta = http.post("/generate", json=body).json()["meta_info"]
        output = [entry[1] for entry in meta["output_token_logprobs"]]
        tokens = ids + output
        expected_out = hf_token_ids_logprobs(hf_lively, tokens, range(len(ids) - 1, len(tokens) - 1), named,
                                             temperature)
        assert len(meta["output_token_ids_logprobs"]) == len(output) == 5
        for position, reference in zip(meta["output_token_ids_logprobs"], expected_out):
            assert [entry[1] for entry in position] == named
            assert [entry[2] for entry in position] == [engine.tokenizer.decode([t]) for t in named]
            assert [entry[0] for entry in position] == pytest.approx(reference, abs=1e-4)
        # the same convention as the sampled token's logprob and the top candidates: equal where they meet
        for position, (sampled_lp, sampled_id, _), top in zip(meta["output_token_ids_logprobs"],
                                                              meta["output_token_logprobs"],
                                                              meta["output_top_logprobs"]):
            by_id = {entry[1]: entry[0] for entry in position}
            if sampled_id in by_id:
                assert by_id[sampled_id] == pytest.approx(sampled_lp, abs=1e-6)
            for logprob, token, _ in top:
                if token in by_id:
                    assert by_id[token] == pytest.approx(logprob, abs=1e-6)
        prompt = meta["input_token_ids_logprobs"]
        assert len(prompt) == len(meta["input_token_logprobs"]) == len(ids) - 1 and prompt[0] is None
        expected_in = hf_token_ids_logprobs(hf_lively, ids, range(1, len(ids) - 1), named, temperature)
        for position, reference in zip(prompt[1:], expected_in):
            assert [entry[1] for entry in position] == named
            assert [entry[0] for entry in position] == pytest.approx(reference, abs=1e-4)
        scores, _ = hf_prompt_logprobs(hf_lively, ids, 1, temperature=temperature)
        assert [entry[0] for entry in meta["input_token_logprobs"][1:]] == pytest.approx(scores, abs=1e-4)


def test_named_token_ids_per_prompt_of_a_batch_and_by_default_prompt_position(http, engine, hf_lively):
    prompts = [engine.tokenizer.encode(p) for p in ("hi", "reverse 12345 please", "ok")]
    sampling = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}
    outputs = http.post("/generate", json={"input_ids": prompts, "return_logprob": True, "sampling_params": sampling,
                                           "token_ids_logprob": [[5], [9, 2], []]}).json()
    for prompt, output, named in zip(prompts[:2], outputs, ([5], [9, 2])):
        meta = output["meta_info"]
        assert meta["input_token_ids_logprobs"] == [None]  # logprob_start_len -1: the last prompt token, unscored
        tokens = prompt + output["output_ids"]
        reference = hf_token_ids_logprobs(hf_lively, tokens, range(len(prompt) - 1, len(tokens) - 1), named)
        assert [[entry[1] for entry in p] for p in meta["output_token_ids_logprobs"]] == [named] * 3
        assert [entry[0] for p in meta["output_token_ids_logprobs"] for entry in p] == pytest.approx(
            [value for values in reference for value in values], abs=1e-4)
        assert all(entry[2] is None for p in meta["output_token_ids_logprobs"] for entry in p)
    assert "output_token_ids_logprobs" not in outputs[2]["meta_info"]  # an empty list asks for nothing
    shared = http.post("/generate", json={"input_ids": prompts[:2], "return_logprob": True,
                                          "sampling_params": sampling, "token_ids_logprob": [9, 2]}).json()
    for one, other in zip(shared[1]["meta_info"]["output_token_ids_logprobs"],
                          outputs[1]["meta_info"]["output_token_ids_logprobs"]):  # other batch-mates: ulps apart
        assert [entry[1] for entry in one] == [entry[1] for entry in other] == [9, 2]
        assert [entry[0] for entry in one] == pytest.approx([entry[0] for entry in other], abs=1e-5)
    plain = http.post("/generate", json={"input_ids": prompts[1], "return_logprob": True,
                                         "sampling_params": sampling}).json()["meta_info"]
    assert "output_token_ids_logprobs" not in plain and "input_token_ids_logprobs" not in plain


def test_a_stream_carries_the_named_token_ids_logprobs_so_far(http, engine):
    body = {"input_ids": engine.tokenizer.encode("hi there"), "return_logprob": True, "token_ids_logprob": [3, 4],
            "logprob_start_len": 0, "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}}
    plain = http.post("/generate", json=body).json()["meta_info"]
    with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    partial = [chunk["meta_info"]["output_token_ids_logprobs"] for chunk in chunks]
    assert [len(named) for named in partial[:-1]] == [1, 2, 3, 4]
    assert partial[-1] == plain["output_token_ids_logprobs"]
    assert all(plain["output_token_ids_logprobs"][: len(named)] == named for named in partial)
    assert all(chunk["meta_info"]["input_token_ids_logprobs"] == plain["input_token_ids_logprobs"] for chunk in chunks)


@pytest.mark.parametrize("extra, field, words", [
    ({"token_ids_logprob": [3, 10**6]}, "token_ids_logprob", "outside the vocabulary"),
    ({"token_ids_logprob": [3, -1]}, "token_ids_logprob", "outside the vocabulary"),
    ({"token_ids_logprob": ["3"]}, "token_ids_logprob", ""),
    ({"token_ids_logprob": [1.5]}, "token_ids_logprob", ""),
    ({"token_ids_logprob": [True]}, "token_ids_logprob", ""),
    ({"token_ids_logprob": 3}, "token_ids_logprob", ""),
    ({"token_ids_logprob": [[3]]}, "token_ids_logprob", "not a list of lists"),
    ({"token_ids_logprob": [3], "return_logprob": False}, "token_ids_logprob", "return_logprob"),
    ({"token_ids_logprob": [3] * 257}, "token_ids_logprob", "limit is 256 (--sglang-max-token-ids-logprob)"),
])
def test_bad_named_token_ids_are_refused_naming_the_field(http, extra, field, words):
    body = {"text": "hi", "return_logprob": True, "sampling_params": {"max_new_tokens": 1}, **extra}
    response = http.post("/generate", json=body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert field in message and words in message


def test_bad_named_token_ids_of_a_batch_name_the_prompt(http):
    body = {"text": ["hi", "ok"], "return_logprob": True, "sampling_params": {"max_new_tokens": 1}}
    response = http.post("/generate", json={**body, "token_ids_logprob": [[1], [2, 10**6]]})
    assert response.status_code == 400 and "token_ids_logprob[1]" in response.json()["error"]["message"]
    response = http.post("/generate", json={**body, "token_ids_logprob": [[1]]})
    assert response.status_code == 400 and "1 entries for 2 prompts" in response.json()["error"]["message"]


# ----------------------------------------------------------------------------------------------- OpenAI
def test_completions_top_logprobs_parse_with_the_openai_client(openai_client, engine, hf_lively):
    ids = engine.tokenizer.encode("reverse 12345 please")
    reply = openai_client.completions.create(model="lively", prompt=ids, max_tokens=6, temperature=0.9, seed=2,
                                             logprobs=3, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    reference = hf_top_logprobs(hf_lively, ids, choice.token_ids, 3, 0.9)
    assert len(choice.logprobs.top_logprobs) == 6
    for top, (ref_ids, ref_logprobs), piece, logprob in zip(choice.logprobs.top_logprobs, reference,
                                                           choice.logprobs.tokens, choice.logprobs.token_logprobs):
        expected = dict(zip((engine.tokenizer.decode([t]) for t in ref_ids), ref_logprobs))
        expected.setdefault(piece, logprob)  # OpenAI: the sampled token too, "up to logprobs+1" entries
        assert top.keys() == expected.keys() and list(top.values()) == sorted(top.values(), reverse=True)
        assert list(top.values()) == pytest.approx([expected[key] for key in top], abs=1e-4)
        assert top[piece] == pytest.approx(logprob, abs=1e-6)


def test_chat_top_logprobs_parse_with_the_openai_client(openai_client, engine, hf_lively):
    messages = [{"role": "user", "content": "add 3 and 4"}]
    prompt = chat_prompt(engine, messages)
    reply = openai_client.chat.completions.create(model="lively", messages=messages, max_tokens=5, temperature=0,
                                                  logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    reference = hf_top_logprobs(hf_lively, prompt, reply.choices[0].token_ids, 4)
    assert len(content) == 5
    for entry, (ref_ids, ref_logprobs) in zip(content, reference):
        assert [alt.token for alt in entry.top_logprobs] == [engine.tokenizer.decode([t]) for t in ref_ids]
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(ref_logprobs, abs=1e-4)
        assert all(alt.bytes == list(alt.token.encode("utf-8")) for alt in entry.top_logprobs)
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
    stream = openai_client.chat.completions.create(model="lively", messages=messages, max_tokens=5, temperature=0,
                                                   logprobs=True, top_logprobs=4, stream=True,
                                                   extra_body={"ignore_eos": True})
    streamed = [entry for chunk in stream if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert len(streamed) == len(content)
    for streamed_entry, entry in zip(streamed, content):  # the stream reuses the cached prompt: float noise only
        assert [alt.token for alt in streamed_entry.top_logprobs] == [alt.token for alt in entry.top_logprobs]
        assert [alt.logprob for alt in streamed_entry.top_logprobs] == \
            pytest.approx([alt.logprob for alt in entry.top_logprobs], abs=1e-5)


def test_logprobs_without_top_logprobs_stay_empty(openai_client):
    reply = openai_client.chat.completions.create(model="lively", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in reply.choices[0].logprobs.content)
