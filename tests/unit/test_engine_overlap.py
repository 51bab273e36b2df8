"""The overlapped engine loop (the GPU default: step k+1 is launched before step k's tokens are read back), run on
CPU: every request ends exactly as in the step-by-step loop, whatever stops it, and nothing pending leaks out."""

from __future__ import annotations

import threading
import time

import pytest

from sluice.config import EngineConfig
from sluice.engine.clients.protocol import FinishReason, GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.engine.sequence import PENDING_TOKEN
from sluice.types import SamplingParams
from helpers.engine_calls import generate


def make_engine(checkpoint: str, overlap: bool, **settings) -> LocalEngine:
    engine = LocalEngine(checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=4, **settings))
    engine.overlap = overlap
    return engine


def mixed_requests(engine: LocalEngine) -> list[GenerateRequest]:
    """Greedy and seeded requests that stop on EOS, a stop token, a stop string or their length, some sharing a
    prompt; a finished request's extra overlapped step must change none of them."""
    reference = generate(engine, [GenerateRequest([5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_new_tokens=12,
                                                                                ignore_eos=True))])[0].output_ids
    text = engine.tokenizer.decode(reference[4:8])
    requests = []
    for i in range(12):
        prompt = [5, 6, 7, 8, 9] if i % 3 == 0 else list(range(10 + i, 30 + i))
        params = dict(temperature=0.0 if i % 2 else 1.0, seed=None if i % 2 else i, max_new_tokens=3 + 2 * i)
        if i == 3:
            params["stop_token_ids"] = [reference[5]]
        if i == 6:  # greedy on the reference prompt: the stop string comes up
            params.update(temperature=0.0, seed=None, stop=[text[1:3]])
        if i % 4 == 1:
            params["ignore_eos"] = True
        requests.append(GenerateRequest(prompt, SamplingParams(**params), return_logprob=True, rid=f"r{i}",
                                        top_logprobs_num=i % 4))
    return requests


def outcome(result) -> tuple:
    return (result.output_ids, result.finish_reason, result.matched_stop, result.text, result.cached_tokens,
            result.weight_versions)


@pytest.mark.parametrize("settings", [{}, {"max_total_tokens": 64, "disable_radix_cache": True}],
                         ids=["prefix-cache", "preemption"])
def test_overlapped_steps_give_the_same_results(lively_checkpoint, settings):
    stepwise, overlapped = make_engine(lively_checkpoint, False, **settings), make_engine(lively_checkpoint, True, **settings)
    try:
        requests = mixed_requests(stepwise)
        assert stepwise.flush_cache()  # both engines start from an empty prefix cache
        expected = generate(stepwise, requests)
        got = generate(overlapped, [GenerateRequest(r.input_ids, r.sampling_params, return_logprob=True, rid=r.rid,
                                                    top_logprobs_num=r.top_logprobs_num) for r in requests])
        if "max_total_tokens" in settings:
            assert overlapped.scheduler.num_preemptions > 0
    finally:
        stepwise.shutdown()
        overlapped.shutdown()
    reasons = {r.finish_reason for r in expected}
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}  # the cases above stop both ways
    assert any(r.matched_stop is not None and isinstance(r.matched_stop, str) for r in expected)
    for request, want, have in zip(requests, expected, got):
        assert outcome(have) == outcome(want)
        assert max((abs(a - b) for a, b in zip(have.output_logprobs, want.output_logprobs)), default=0.0) < 1e-5
        assert len(have.output_logprobs) == len(have.output_ids)
        # top candidates: one per kept token (none from a dropped overlapped step), the same as step by step
        assert len(have.output_top_logprobs) == (len(have.output_ids) if request.top_logprobs_num else 0)
        for top, reference in zip(have.output_top_logprobs, want.output_top_logprobs):
            assert top.token_ids == reference.token_ids and len(top.token_ids) == request.top_logprobs_num
            assert top.logprobs == pytest.approx(reference.logprobs, abs=1e-5)


def test_streamed_pieces_and_aborted_outputs_hold_no_pending_token(lively_checkpoint):
    engine = make_engine(lively_checkpoint, True)
    try:
        full = generate(engine, [GenerateRequest([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=40,
                                                                          ignore_eos=True))])[0].output_ids
        pieces: list[int] = []
        streamed = threading.Event()
        aborted = threading.Event()
        done = threading.Event()
        box = []

        def on_update(ids, logprobs, top, named):  # on the worker thread, the next step launched
            assert len(ids) == len(logprobs)
            pieces.extend(ids)
            if len(pieces) >= 5 and not streamed.is_set():
                streamed.set()
                aborted.wait(30)  # the worker goes on only once the abort is asked: it cannot finish first

        request = GenerateRequest([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True),
                                  rid="long")
        engine.submit(request, lambda r: (box.append(r), done.set()), on_update)
        assert streamed.wait(30)
        engine.abort("long")
        aborted.set()
        assert done.wait(30)
    finally:
        aborted.set()
        engine.shutdown()
    result = box[0]
    assert result.finish_reason == FinishReason.ABORT
    assert PENDING_TOKEN not in result.output_ids and 5 <= len(result.output_ids) < 40
    assert result.output_ids == full[: len(result.output_ids)] == pieces[: len(result.output_ids)]
    assert pieces == result.output_ids  # every token read back was streamed, and only those


def test_a_weight_update_lands_after_the_step_in_flight(lively_checkpoint, lively_checkpoint_other):
    """A pause asked for between steps stops the overlapped loop one step later: the step already launched is
    read back first, with the version it was launched with."""
    engine = make_engine(lively_checkpoint, True)
    fresh = make_engine(lively_checkpoint_other, False)
    try:
        paused = threading.Event()
        done = threading.Event()
        box = []

        def on_update(ids, logprobs, top, named):
            if not paused.is_set():
                engine.pause()
                paused.set()

        engine.pause()
        engine.submit(GenerateRequest([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)),
                      lambda r: (box.append(r), done.set()), on_update)
        engine.resume()
        assert paused.wait(30)
        engine.update_weights(lively_checkpoint_other, version=3)
        assert engine._in_flight is None  # the control call waited for the step in flight to be read back
        engine.resume()
        assert done.wait(30)
        engine.release_memory()  # and memory release / resume work between overlapped steps
        engine.resume_memory()
        again = generate(engine, [GenerateRequest([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=6))])[0]
        expected = generate(fresh, [GenerateRequest([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=6))])[0]
    finally:
        engine.shutdown()
        fresh.shutdown()
    versions = box[0].weight_versions
    assert versions == [0, 0] + [3] * 10  # the first token paused the loop; the second was already launched
    assert again.output_ids == expected.output_ids


def test_control_calls_wait_for_the_step_in_flight(lively_checkpoint, monkeypatch):
    """A control call made while a step is on the device goes ahead only once the worker has read that step back.
    The call is made while the worker sits in a streaming callback, right after launching a step."""
    from sluice.engine import local_engine

    engine = make_engine(lively_checkpoint, True)
    in_flight_at_call: list[bool] = []
    checksums = local_engine.named_checksums

    def recording(weights):
        in_flight_at_call.append(engine._in_flight is not None)
        return checksums(weights)

    monkeypatch.setattr(local_engine, "named_checksums", recording)
    in_callback = threading.Event()
    done = threading.Event()
    box = []

    def on_update(ids, logprobs, top, named):  # on the worker thread, outside the step lock, the next step launched
        if not in_callback.is_set():
            in_callback.set()
            time.sleep(0.3)  # a control call made now must wait for the worker, not slip in beside the step

    try:
        engine.submit(GenerateRequest([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)),
                      lambda r: (box.append(r), done.set()), on_update)
        assert in_callback.wait(30)
        engine.weight_checksums()
        assert done.wait(30)
    finally:
        engine.shutdown()
    assert in_flight_at_call == [False]
    assert len(box[0].output_ids) == 30 and PENDING_TOKEN not in box[0].output_ids
