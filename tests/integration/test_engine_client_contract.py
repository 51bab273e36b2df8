"""The EngineClient contract (sluice/engine/clients/protocol.py), one set of tests run against every client:

  in-process  InProcessClient over a LocalEngine in this process
  http        HttpEngineClient against a real `sluice serve` app on 127.0.0.1 (a server thread)
  router      MultiEngineClient over two such servers, each with its own engine

Every engine serves the lively checkpoint (CPU, float32), and the expected tokens and logprobs come from plain
transformers forwards of the same checkpoints, so each client is held to the same reference rather than to
another client. The router's two engines hold the same weights: its routing cannot change an output.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.engine.clients.http import EngineHTTPError, HttpEngineClient
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import EngineClient, FinishReason, GenerateRequest, GenerateResult
from sluice.engine.clients.router import MultiEngineClient
from sluice.engine.local_engine import LocalEngine
from sluice.models.tokenizer import load_tokenizer
from sluice.types import SamplingParams

from helpers.reference import hf_greedy, hf_logprobs, hf_prompt_logprobs, hf_token_ids_logprobs, hf_top_logprobs
from helpers.servers import CPU, start_server

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

PROMPTS = ["hi", "what is 2+2?", "reverse 12345 please"]  # "hi": greedy emits EOS after a few tokens
HELD_S = 0.3  # how long a paused engine is watched for (no) progress
SCENARIO_TIMEOUT_S = 60.0  # a broken pause or abort fails the test instead of hanging the suite


@dataclass
class Served:
    client: EngineClient
    takes_named_tensors: bool  # update_weights accepts a name -> tensor mapping (HTTP carries only paths)
    engines: list[LocalEngine]  # the engines behind the client, in this process


@pytest.fixture(scope="module", params=["in-process", "http", "router"])
def served(request, lively_checkpoint):
    engines = [LocalEngine(lively_checkpoint, CPU) for _ in range(2 if request.param == "router" else 1)]
    servers = [start_server(engine, lively_checkpoint) for engine in engines] if request.param != "in-process" else []
    if request.param == "in-process":
        served = Served(InProcessClient(engines[0]), takes_named_tensors=True, engines=engines)
    elif request.param == "http":
        served = Served(HttpEngineClient(servers[0].url), takes_named_tensors=False, engines=engines)
    else:
        served = Served(MultiEngineClient([HttpEngineClient(s.url) for s in servers]), takes_named_tensors=False,
                        engines=engines)
    yield served
    for server in servers:
        server.stop()
    for engine in engines:
        engine.shutdown()


@pytest.fixture(scope="module")
def hf_other(lively_checkpoint_other):
    return AutoModelForCausalLM.from_pretrained(lively_checkpoint_other, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(lively_checkpoint):
    return load_tokenizer(lively_checkpoint)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


def run(client: EngineClient, scenario):
    """Run ``scenario(client)`` on a fresh event loop; resume the engines and close connections whatever happens."""

    async def guarded():
        try:
            return await asyncio.wait_for(scenario(client), SCENARIO_TIMEOUT_S)
        finally:
            await client.resume()  # a failed pause test must not leave the module's engines held
            if hasattr(client, "aclose"):
                await client.aclose()

    return asyncio.run(guarded())


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **kw)


async def until_queued(engines: list[LocalEngine], count: int) -> None:
    """Wait until the engines hold ``count`` requests. An HTTP client's task may already be waiting for its answer
    while the request is still on its way to the server, and an abort that gets there first finds nothing to abort
    (the request then waits on the paused engine). Bounded by SCENARIO_TIMEOUT_S."""
    while sum(engine.load()["num_waiting"] + engine.load()["num_running"] for engine in engines) < count:
        await asyncio.sleep(0.01)


async def still_running(task: asyncio.Future) -> bool:
    await asyncio.wait([task], timeout=HELD_S)
    return not task.done()


def assert_version_stamped(result: GenerateResult, version: int) -> None:
    """The result's version, and the per-token versions where the client reports them (one per output token)."""
    assert result.weight_version == version
    assert result.weight_versions in ([], [version] * len(result.output_ids))


# --------------------------------------------------------------------------------------------- generate
def test_greedy_generate_returns_the_reference_tokens_their_logprobs_and_the_version(served, hf_lively, prompt_ids):
    requests = [GenerateRequest(ids, greedy(8, ignore_eos=True), rid=f"greedy-{i}") for i, ids in enumerate(prompt_ids)]

    async def scenario(client):
        return await asyncio.gather(*(client.generate(r) for r in requests)), await client.weight_version()

    results, version = run(served.client, scenario)
    for request, result in zip(requests, results):
        expected = hf_greedy(hf_lively, request.input_ids, 8)
        assert result.rid == request.rid
        assert result.output_ids == expected
        assert result.output_logprobs == pytest.approx(hf_logprobs(hf_lively, request.input_ids, expected), abs=1e-4)
        assert result.finish_reason is FinishReason.LENGTH
        assert result.prompt_tokens == len(request.input_ids)
        assert_version_stamped(result, version)


def test_top_logprobs_are_the_reference_alternatives_before_truncation(served, hf_lively, prompt_ids):
    """Greedy and sampled (top-p truncated) requests: each output position's top candidates, at the request's
    temperature and before truncation; a request that does not ask gets none."""
    greedy_request = GenerateRequest(prompt_ids[0], greedy(6, ignore_eos=True), top_logprobs_num=4)
    sampled = SamplingParams(temperature=0.7, top_p=0.5, max_new_tokens=6, ignore_eos=True, seed=5)
    sampled_request = GenerateRequest(prompt_ids[2], sampled, top_logprobs_num=2)
    plain_request = GenerateRequest(prompt_ids[1], greedy(3, ignore_eos=True))

    async def scenario(client):
        return await asyncio.gather(*(client.generate(r) for r in (greedy_request, sampled_request, plain_request)))

    results = run(served.client, scenario)
    for request, result, temperature in zip((greedy_request, sampled_request), results, (1.0, 0.7)):
        expected = hf_top_logprobs(hf_lively, request.input_ids, result.output_ids, request.top_logprobs_num,
                                   temperature)
        assert len(result.output_top_logprobs) == len(result.output_ids) == 6
        for top, (ids, logprobs), token, logprob in zip(result.output_top_logprobs, expected, result.output_ids,
                                                        result.output_logprobs):
            assert top.token_ids == ids and top.logprobs == pytest.approx(logprobs, abs=1e-4)
            assert top.logprobs == sorted(top.logprobs, reverse=True)
            if token in top.token_ids:  # the sampled token's entry is its reported logprob
                assert top.logprobs[top.token_ids.index(token)] == pytest.approx(logprob, abs=1e-5)
    assert results[0].output_ids == [top.token_ids[0] for top in results[0].output_top_logprobs]  # greedy: argmax
    assert results[2].output_top_logprobs == []


def test_prompt_logprobs_from_a_start_position_and_a_prefill_only_request(served, hf_lively, prompt_ids):
    """``logprob_start_len``: each prompt token's logprob from there on (the first None) and, with
    ``top_logprobs_num``, its top candidates; ``max_new_tokens`` 0 scores the prompt and generates nothing."""
    prompt = prompt_ids[2]
    scored = GenerateRequest(prompt, greedy(3, ignore_eos=True), logprob_start_len=1, top_logprobs_num=3)
    prefill_only = GenerateRequest(prompt, greedy(0), logprob_start_len=0)
    default = GenerateRequest(prompt, greedy(2, ignore_eos=True))

    async def scenario(client):
        return await asyncio.gather(*(client.generate(r) for r in (scored, prefill_only, default)))

    results = run(served.client, scenario)
    for request, result in zip((scored, prefill_only), results):
        start = request.logprob_start_len
        values, tops = hf_prompt_logprobs(hf_lively, prompt, start, request.top_logprobs_num)
        assert result.input_logprobs[0] is None and len(result.input_logprobs) == len(prompt) - start
        assert result.input_logprobs[1:] == pytest.approx(values, abs=1e-4)
        if request.top_logprobs_num:
            assert result.input_top_logprobs[0] is None
            for top, (ids, logprobs) in zip(result.input_top_logprobs[1:], tops):
                assert top.token_ids == ids and top.logprobs == pytest.approx(logprobs, abs=1e-4)
        else:
            assert result.input_top_logprobs == []
    assert len(results[0].output_ids) == 3
    assert results[1].output_ids == [] and results[1].finish_reason is FinishReason.LENGTH
    assert results[2].input_logprobs == [None]  # SGLang's default: the last prompt token, nothing computed


def test_named_token_ids_logprobs_at_output_and_prompt_positions(served, hf_lively, prompt_ids):
    """``token_ids_logprob``: the logprobs of those ids, in order, at each output position and each scored prompt
    position (the first None), at the request's temperature; a request that names none gets none."""
    prompt, named = prompt_ids[2], [4, 9, 4]
    sampled = SamplingParams(temperature=0.7, top_p=0.5, max_new_tokens=4, ignore_eos=True, seed=5)
    asking = GenerateRequest(prompt, sampled, logprob_start_len=1, token_ids_logprob=named)
    plain = GenerateRequest(prompt, greedy(2, ignore_eos=True))

    async def scenario(client):
        return await asyncio.gather(*(client.generate(r) for r in (asking, plain)))

    result, unasked = run(served.client, scenario)
    tokens = prompt + result.output_ids
    expected = hf_token_ids_logprobs(hf_lively, tokens, range(len(prompt) - 1, len(tokens) - 1), named, 0.7)
    assert len(result.output_token_ids_logprobs) == 4
    for got, reference in zip(result.output_token_ids_logprobs, expected):
        assert got == pytest.approx(reference, abs=1e-4)
    assert result.input_token_ids_logprobs[0] is None and len(result.input_token_ids_logprobs) == len(prompt) - 1
    expected = hf_token_ids_logprobs(hf_lively, prompt, range(1, len(prompt) - 1), named, 0.7)
    for got, reference in zip(result.input_token_ids_logprobs[1:], expected):
        assert got == pytest.approx(reference, abs=1e-4)
    assert unasked.output_token_ids_logprobs == [] and unasked.input_token_ids_logprobs == []


def test_a_limit_past_the_context_ends_the_request_at_the_context(served, hf_lively, prompt_ids):
    """The context bounds prompt + output whatever max_new_tokens says (HTTP servers refuse such a limit with 400;
    the HTTP client lowers it to the room the prompt leaves)."""
    context_len = hf_lively.config.max_position_embeddings
    prompt = (prompt_ids[1] * context_len)[: context_len - 5]
    result = run(served.client, lambda client: client.generate(GenerateRequest(prompt, greedy(10**6, ignore_eos=True))))
    assert result.finish_reason is FinishReason.LENGTH
    assert result.output_ids == hf_greedy(hf_lively, prompt, 5)


def test_sampled_tokens_come_with_their_logprobs_at_the_temperature(served, hf_lively, prompt_ids):
    prompt = prompt_ids[1]
    params = SamplingParams(temperature=0.7, max_new_tokens=12, ignore_eos=True, seed=3)

    async def scenario(client):
        return [await client.generate(GenerateRequest(prompt, params)) for _ in range(2)]

    first, again = run(served.client, scenario)
    assert len(first.output_ids) == len(first.output_logprobs) == 12
    # log softmax(logits / temperature) of each sampled token: not the greedy token's, not at temperature 1
    assert first.output_logprobs == pytest.approx(hf_logprobs(hf_lively, prompt, first.output_ids, 0.7), abs=1e-4)
    assert first.output_ids != hf_greedy(hf_lively, prompt, 12)  # seed 3 leaves the greedy path
    assert again.output_ids == first.output_ids  # a request's seed fixes its tokens


def test_return_logprob_false_returns_the_tokens_without_logprobs(served, hf_lively, prompt_ids):
    prompt = prompt_ids[2]
    request = GenerateRequest(prompt, greedy(5, ignore_eos=True), return_logprob=False)
    result = run(served.client, lambda client: client.generate(request))
    assert result.output_ids == hf_greedy(hf_lively, prompt, 5)
    assert result.output_logprobs == []


# --------------------------------------------------------------------------------------- finish reasons
def test_eos_stops_with_the_eos_token_kept_in_the_output(served, hf_lively, tokenizer, prompt_ids):
    prompt, eos = prompt_ids[0], tokenizer.eos_token_id
    reference = hf_greedy(hf_lively, prompt, 16)
    assert eos in reference[1:]  # precondition of the lively checkpoint: greedy says EOS after a token or more
    eos_at = reference.index(eos)

    async def scenario(client):
        return (await client.generate(GenerateRequest(prompt, greedy(16))),
                await client.generate(GenerateRequest(prompt, greedy(eos_at + 3, ignore_eos=True))),
                await client.generate(GenerateRequest(prompt, greedy(eos_at))))

    stopped, ignored, cut = run(served.client, scenario)
    assert stopped.finish_reason is FinishReason.STOP and stopped.matched_stop == eos
    assert stopped.output_ids == reference[: eos_at + 1]
    assert len(stopped.output_logprobs) == eos_at + 1
    assert ignored.finish_reason is FinishReason.LENGTH and ignored.output_ids == reference[: eos_at + 3]
    assert cut.finish_reason is FinishReason.LENGTH and cut.output_ids == reference[:eos_at]


def test_a_stop_token_id_ends_the_output_on_that_token(served, hf_lively, prompt_ids):
    prompt = prompt_ids[2]
    reference = hf_greedy(hf_lively, prompt, 10)
    k = next(i for i in range(2, 10) if reference[i] not in reference[:i])  # its first occurrence is at k
    request = GenerateRequest(prompt, greedy(10, ignore_eos=True, stop_token_ids=[reference[k]]))
    result = run(served.client, lambda client: client.generate(request))
    assert result.finish_reason is FinishReason.STOP and result.matched_stop == reference[k]
    assert result.output_ids == reference[: k + 1]
    assert len(result.output_logprobs) == k + 1


# --------------------------------------------------------------------------------------- weight updates
def test_a_checkpoint_directory_update_bumps_the_version_and_changes_the_outputs(
        served, hf_lively, hf_other, prompt_ids, lively_checkpoint, lively_checkpoint_other):
    prompt = prompt_ids[1]

    async def scenario(client):
        version = await client.weight_version()
        before = await client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True)))
        await client.update_weights(lively_checkpoint_other, version + 1)
        reported = await client.weight_version()
        after = await client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True)))
        await client.update_weights(lively_checkpoint, version + 2)
        restored = await client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True)))
        return version, before, reported, after, restored

    version, before, reported, after, restored = run(served.client, scenario)
    assert before.output_ids == hf_greedy(hf_lively, prompt, 8)
    assert_version_stamped(before, version)
    assert reported == version + 1
    assert after.output_ids == hf_greedy(hf_other, prompt, 8) != before.output_ids
    assert after.output_logprobs == pytest.approx(hf_logprobs(hf_other, prompt, after.output_ids), abs=1e-4)
    assert_version_stamped(after, version + 1)
    assert restored.output_ids == before.output_ids
    assert_version_stamped(restored, version + 2)


def test_named_tensors_are_loaded_or_refused_before_anything_changes(served, hf_lively, hf_other, prompt_ids,
                                                                     lively_checkpoint):
    prompt = prompt_ids[1]
    named = {name: tensor.clone() for name, tensor in hf_other.state_dict().items()}

    async def scenario(client):
        version = await client.weight_version()
        if not served.takes_named_tensors:
            with pytest.raises(TypeError, match="named tensors"):
                await client.update_weights(named, version + 1)
            unchanged = await client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True)))
            return version, await client.weight_version(), unchanged
        await client.update_weights(named, version + 1)
        loaded = await client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True)))
        reported = await client.weight_version()
        await client.update_weights(lively_checkpoint, version + 2)
        return version, reported, loaded

    version, reported, result = run(served.client, scenario)
    if served.takes_named_tensors:
        assert reported == version + 1
        assert result.output_ids == hf_greedy(hf_other, prompt, 8)
        assert_version_stamped(result, version + 1)
    else:
        assert reported == version
        assert result.output_ids == hf_greedy(hf_lively, prompt, 8)
        assert_version_stamped(result, version)


def test_an_older_version_is_refused_and_changes_nothing(served, hf_lively, prompt_ids, lively_checkpoint,
                                                         lively_checkpoint_other):
    prompt = prompt_ids[1]

    async def scenario(client):
        version = await client.weight_version() + 1
        await client.update_weights(lively_checkpoint, version)  # same weights, newer version
        with pytest.raises((ValueError, EngineHTTPError), match="older"):
            await client.update_weights(lively_checkpoint_other, version - 1)
        after = await client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True)))
        return version, await client.weight_version(), after

    version, reported, after = run(served.client, scenario)
    assert reported == version
    assert after.output_ids == hf_greedy(hf_lively, prompt, 8)  # the refused weights were never loaded
    assert_version_stamped(after, version)


# ----------------------------------------------------------------------------------- abort, pause, resume
def test_pause_holds_requests_and_resume_finishes_them_unchanged(served, hf_lively, prompt_ids):
    prompts = prompt_ids[1:]  # two requests: the router sends them to different engines

    async def scenario(client):
        await client.pause()
        held = [asyncio.ensure_future(client.generate(GenerateRequest(p, greedy(6, ignore_eos=True)))) for p in prompts]
        await until_queued(served.engines, len(prompts))  # in the engines: held by the pause, not by the network
        await asyncio.wait(held, timeout=HELD_S)
        num_held = sum(not task.done() for task in held)
        await client.resume()
        return num_held, await asyncio.gather(*held)

    num_held, finished = run(served.client, scenario)
    assert num_held == len(prompts), "a paused engine finished a request"
    for prompt, result in zip(prompts, finished):
        assert result.finish_reason is FinishReason.LENGTH
        assert result.output_ids == hf_greedy(hf_lively, prompt, 6)


def test_abort_by_rid_ends_that_request_only_with_its_partial_output(served, hf_lively, prompt_ids):
    long = GenerateRequest(prompt_ids[1], greedy(400, ignore_eos=True), rid="abort-me")
    short = GenerateRequest(prompt_ids[0], greedy(4, ignore_eos=True))

    async def scenario(client):
        await client.pause()
        doomed = asyncio.ensure_future(client.generate(long))
        kept = asyncio.ensure_future(client.generate(short))
        assert await still_running(doomed)
        await until_queued(served.engines, 2)
        await client.abort(long.rid)
        aborted = await doomed  # answered even while the engine is paused
        kept_while_paused = not kept.done()
        await client.resume()
        return aborted, kept_while_paused, await kept

    aborted, kept_while_paused, kept = run(served.client, scenario)
    assert aborted.rid == long.rid
    assert aborted.finish_reason is FinishReason.ABORT
    assert len(aborted.output_ids) == len(aborted.output_logprobs) < 400
    assert kept_while_paused
    assert kept.finish_reason is FinishReason.LENGTH and kept.output_ids == hf_greedy(hf_lively, prompt_ids[0], 4)


def test_abort_all_ends_every_request_in_flight_and_nothing_after(served, prompt_ids):
    async def scenario(client):
        await client.pause()
        tasks = [asyncio.ensure_future(client.generate(GenerateRequest(p, greedy(300, ignore_eos=True))))
                 for p in prompt_ids[:2]]
        assert await still_running(tasks[0])
        await until_queued(served.engines, len(tasks))
        await client.abort()
        aborted = await asyncio.gather(*tasks)
        await client.resume()
        later = await client.generate(GenerateRequest(prompt_ids[2], greedy(3, ignore_eos=True)))
        return aborted, later

    aborted, later = run(served.client, scenario)
    assert [r.finish_reason for r in aborted] == [FinishReason.ABORT, FinishReason.ABORT]
    assert all(len(r.output_ids) < 300 for r in aborted)
    assert later.finish_reason is FinishReason.LENGTH and len(later.output_ids) == 3
