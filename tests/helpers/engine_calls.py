"""Requests to a LocalEngine from the test thread: submit, wait for every result; greedy sampling params."""

from __future__ import annotations

import threading

from sluice.engine.clients.protocol import GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.types import SamplingParams


def generate(engine: LocalEngine, requests: list[GenerateRequest], timeout: float = 60.0):
    results: dict[str, object] = {}
    finished = threading.Event()

    def on_done(result, rid):
        results[rid] = result
        if len(results) == len(requests):
            finished.set()

    for request in requests:
        engine.submit(request, lambda result, rid=request.rid: on_done(result, rid))
    assert finished.wait(timeout), "engine did not finish in time"
    return [results[r.rid] for r in requests]


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
