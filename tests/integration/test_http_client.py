"""HttpEngineClient and MultiEngineClient against real `sluice serve` servers on 127.0.0.1.

Two servers hold different weights (lively / lively_other), so greedy outputs tell which engine served a request:
that is how group affinity and least-outstanding routing are checked."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import aiohttp
import httpx
import pytest

from sluice.engine.clients.http import EngineHTTPError, HttpClientOptions, HttpEngineClient, parse_generate_response
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import EngineUnavailable, FinishReason, GenerateRequest
from sluice.engine.clients.router import MultiEngineClient
from sluice.engine.server.app import BackgroundServer
from sluice.engine.server.context import ServerContext
from sluice.engine.server.native_api import version_runs
from sluice.types import SamplingParams

from helpers.servers import CPU, free_port, start_server


@pytest.fixture(scope="module")
def servers(engine, engine_other, lively_checkpoint, lively_checkpoint_other):
    started = [start_server(engine, lively_checkpoint), start_server(engine_other, lively_checkpoint_other)]
    yield [s.url for s in started]
    for server in started:
        server.stop()


def request(ids: list[int], num_tokens: int = 6, group_key: str | None = None, **params) -> GenerateRequest:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=num_tokens, ignore_eos=True, **params)
    return GenerateRequest(list(ids), sampling, group_key=group_key)


def reference(engine, ids: list[int], num_tokens: int = 6, **params):
    return asyncio.run(InProcessClient(engine).generate(request(ids, num_tokens, **params)))


def run(coroutine):
    return asyncio.run(coroutine)


async def until_done_or_timeout(task: asyncio.Task, seconds: float) -> bool:
    await asyncio.wait([task], timeout=seconds)
    return task.done()


async def until_queued(engine, count: int) -> None:
    """Wait until ``engine`` (served over HTTP from this process) holds ``count`` requests. A client's task may be
    waiting for its answer while the request is still on its way to the server, and an abort that gets there first
    finds nothing to abort: the request would then wait on the paused engine for ever."""
    deadline = time.monotonic() + 30
    while engine.load()["num_waiting"] + engine.load()["num_running"] < count:
        assert time.monotonic() < deadline, f"{count} request(s) never reached the engine"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------------------- HttpEngineClient
def test_generate_matches_the_in_process_engine(servers, engine):
    ids = engine.tokenizer.encode("what is 2+2?")
    expected = reference(engine, ids)

    async def go():
        client = HttpEngineClient(servers[0])
        try:
            return await client.generate(request(ids))
        finally:
            await client.aclose()

    result = run(go())
    assert result.output_ids == expected.output_ids and result.text == expected.text
    assert result.output_logprobs == pytest.approx(expected.output_logprobs, abs=1e-5)
    assert result.finish_reason is FinishReason.LENGTH and result.prompt_tokens == len(ids)
    assert result.weight_version == engine.weight_version
    # sluice's per-token versions survive the trip (run-length encoded in meta_info.weight_version_runs)
    assert result.weight_versions == expected.weight_versions == [engine.weight_version] * len(result.output_ids)


def test_stop_string_and_http_errors(servers, engine):
    ids = engine.tokenizer.encode("reverse 12345 please")
    stop = reference(engine, ids, 10).text[3:5]

    async def go():
        client = HttpEngineClient(servers[0])
        stopped = await client.generate(request(ids, 10, stop=[stop]))
        with pytest.raises(EngineHTTPError, match="input_ids") as refused:
            await client.generate(request([5, 10**6]))
        with pytest.raises(TypeError, match="distributed"):
            await client.update_weights({"lm_head.weight": None}, 1)
        return stopped, refused.value.status

    stopped, status = run(go())
    assert stopped.finish_reason is FinishReason.STOP and stopped.matched_stop == stop and status == 400


def test_abort_pause_resume_and_weight_updates(servers, engine, lively_checkpoint, lively_checkpoint_other):
    ids = engine.tokenizer.encode("hi")
    before = reference(engine, ids).output_ids

    async def go():
        client = HttpEngineClient(servers[0])
        await client.pause()
        held = asyncio.ensure_future(client.generate(request(ids)))
        doomed_request = request(ids, 400)
        doomed = asyncio.ensure_future(client.generate(doomed_request))
        await until_queued(engine, 2)
        assert not await until_done_or_timeout(held, 0.3)  # paused: nothing moves
        await client.abort(doomed_request.rid)
        aborted = await doomed  # an aborted request is answered even while paused
        await client.resume()
        finished = await held
        version = await client.weight_version() + 1
        await client.update_weights(lively_checkpoint_other, version)
        changed = (await client.generate(request(ids))).output_ids, await client.weight_version()
        await client.update_weights(lively_checkpoint, version + 1)
        restored = await client.generate(request(ids))
        return aborted, finished, version, changed, restored

    aborted, finished, version, (changed_ids, changed_version), restored = run(go())
    assert aborted.finish_reason is FinishReason.ABORT and len(aborted.output_ids) < 400
    assert finished.output_ids == before
    assert changed_version == version and changed_ids != before
    assert restored.output_ids == before and restored.weight_version == version + 1
    assert restored.weight_versions == [version + 1] * len(restored.output_ids)


def test_weight_version_runs_round_trip():
    versions = [3, 3, 4, 4, 4, 5]
    runs = version_runs(versions)
    assert runs == [[3, 2], [4, 3], [5, 1]]
    body = {"output_ids": list(range(6)), "meta_info": {"weight_version": "5", "weight_version_runs": runs}}
    assert parse_generate_response(body, request([1]), 0).weight_versions == versions
    body["meta_info"]["weight_version_runs"] = [[3, 2]]  # does not cover the output: not trusted
    assert parse_generate_response(body, request([1]), 0).weight_versions == []


def test_a_cancelled_generate_is_aborted_on_the_server(servers, engine):
    """The engine is paused, so only the abort sent on cancellation can empty its queue."""
    ids = engine.tokenizer.encode("hi")

    async def load(http: httpx.AsyncClient) -> int:
        return (await http.get(servers[0] + "/get_load")).json()[0]["load"]

    async def go():
        client = HttpEngineClient(servers[0])
        async with httpx.AsyncClient() as http:
            await client.pause()
            try:
                task = asyncio.ensure_future(client.generate(request(ids)))
                while await load(http) == 0:
                    await asyncio.sleep(0.01)
                task.cancel()
                deadline = time.monotonic() + 10
                while await load(http) != 0:
                    assert time.monotonic() < deadline, "the cancelled request is still queued"
                    await asyncio.sleep(0.01)
            finally:
                await client.resume()
        return task.cancelled()

    assert run(go())


def test_connection_errors_are_retried_with_backoff(engine, lively_checkpoint):
    port = free_port()  # nothing listens there until the timer starts a server
    ids = engine.tokenizer.encode("hi")
    impatient = HttpEngineClient(f"http://127.0.0.1:{port}", HttpClientOptions(max_retries=0))
    with pytest.raises(aiohttp.ClientConnectorError):
        run(impatient.weight_version())
    late: dict = {}

    def start_late() -> None:
        # The server listens from its constructor on and answers only once started: noting it in between means
        # it is noted before any request can have been answered.
        late["server"] = BackgroundServer(ServerContext(engine, lively_checkpoint, "lively", CPU), port=port)
        late["server"].start()

    starter = threading.Timer(0.5, start_late)
    starter.start()
    patient = HttpEngineClient(f"http://127.0.0.1:{port}", HttpClientOptions(max_retries=8, backoff_s=0.1))
    try:
        result = run(patient.generate(request(ids)))  # connect errors: safe to retry even a generate
        assert "server" in late  # it answered only once the late server existed: the refused attempts were retried
        assert result.output_ids == reference(engine, ids).output_ids
    finally:
        starter.join()
        late["server"].stop()


# ----------------------------------------------------------------------------------------- MultiEngineClient
def which_engine(result, references: list[list[int]]) -> int:
    matches = [i for i, ref in enumerate(references) if result.output_ids == ref]
    assert len(matches) == 1, "the two engines must disagree on this prompt"
    return matches[0]


def test_groups_stay_on_one_engine(servers, engine, engine_other):
    prompts = [engine.tokenizer.encode(p) for p in ("add 3 and 4", "add 5 and 6", "add 7 and 8")]
    refs = [[reference(e, ids).output_ids for e in (engine, engine_other)] for ids in prompts]

    async def go():
        multi = MultiEngineClient([HttpEngineClient(url) for url in servers])
        groups = [[request(ids, group_key=f"group-{g}") for _ in range(4)] for g, ids in enumerate(prompts)]
        results = await asyncio.gather(*(multi.generate(r) for group in groups for r in group))
        unkeyed = await asyncio.gather(*(multi.generate(request(prompts[0])) for _ in range(3)))
        return multi, results, unkeyed

    multi, results, unkeyed = run(go())
    placed = [[which_engine(results[4 * g + s], refs[g]) for s in range(4)] for g in range(3)]
    # Requests are routed as they are created: group 0 -> engine 0 (tie), group 1 -> engine 1 (engine 0 has 4
    # outstanding), group 2 -> engine 0 (4 each, engine 0 has been given no more so far).
    assert placed == [[0] * 4, [1] * 4, [0] * 4]
    # Same prompt, no key: one engine, the one given fewer requests so far; then it sticks.
    assert [which_engine(r, refs[0]) for r in unkeyed] == [1, 1, 1]
    assert multi.outstanding == [0, 0] and multi.num_routed == [8, 7]


def test_least_outstanding_routing(servers, engine, engine_other):
    ids = engine.tokenizer.encode("hello there")
    refs = [reference(e, ids).output_ids for e in (engine, engine_other)]

    async def go():
        clients = [HttpEngineClient(url) for url in servers]
        multi = MultiEngineClient(clients)
        await clients[0].pause()
        stuck = asyncio.ensure_future(multi.generate(request(ids, group_key="a")))
        await asyncio.sleep(0)  # routed and sent
        second = await multi.generate(request(ids, group_key="b"))
        third = await multi.generate(request(ids, group_key="c"))
        outstanding = list(multi.outstanding)
        await clients[0].resume()
        return await stuck, second, third, outstanding

    stuck, second, third, outstanding = run(go())
    assert outstanding == [1, 0]
    assert [which_engine(r, refs) for r in (stuck, second, third)] == [0, 1, 1]


def test_fan_out_control_and_oldest_weight_version(servers, engine, engine_other, lively_checkpoint,
                                                   lively_checkpoint_other):
    ids = engine.tokenizer.encode("hello there")

    async def go():
        clients = [HttpEngineClient(url) for url in servers]
        multi = MultiEngineClient(clients)
        await multi.pause()
        held = [asyncio.ensure_future(multi.generate(request(ids, 300, group_key=k))) for k in ("x", "y")]
        await until_queued(engine, 1)
        await until_queued(engine_other, 1)
        assert not await until_done_or_timeout(held[0], 0.2)
        assert multi.outstanding == [1, 1]
        await multi.abort()
        aborted = await asyncio.gather(*held)
        await multi.resume()
        versions = [await c.weight_version() for c in clients]
        top = max(versions) + 1
        await clients[1].update_weights(lively_checkpoint_other, top)
        oldest = await multi.weight_version()
        await multi.update_weights(lively_checkpoint_other, top + 1)
        both = await asyncio.gather(*(c.generate(request(ids)) for c in clients))
        after = await multi.weight_version()
        await clients[0].update_weights(lively_checkpoint, top + 2)
        return aborted, versions, oldest, both, after, top

    aborted, versions, oldest, both, after, top = run(go())
    assert [r.finish_reason for r in aborted] == [FinishReason.ABORT] * 2
    assert oldest == versions[0] < top
    assert both[0].output_ids == both[1].output_ids == reference(engine_other, ids).output_ids
    assert after == top + 1
    assert reference(engine, ids).output_ids != both[0].output_ids  # engine 0 back on its own weights


def test_a_dropped_connection_makes_the_engine_unavailable_and_is_retried_only_when_harmless():
    """A server that reads each request and hangs up (after a 404 for the context read): a generate (it may have
    run) is not repeated and raises EngineUnavailable; a version read (harmless to repeat) is retried max_retries
    times."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection.recv(65536))
            if accepted[-1].startswith(b"GET /v1/models "):  # no context length reported: generates go out as asked
                connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    client = HttpEngineClient(f"http://127.0.0.1:{listener.getsockname()[1]}",
                              HttpClientOptions(max_retries=2, backoff_s=0.01))
    try:
        def count(request_line: bytes) -> int:
            return sum(received.startswith(request_line) for received in accepted)

        with pytest.raises(EngineUnavailable):
            run(client.generate(request([1, 2, 3])))
        assert count(b"POST /generate ") == 1 and count(b"GET /v1/models ") == 1
        with pytest.raises(aiohttp.ClientError):
            run(client.weight_version())
        # our three attempts (aiohttp may repeat a GET on a dropped connection itself)
        assert count(b"GET /get_weight_version ") >= 3
    finally:
        listener.close()


def test_a_failed_context_read_is_read_again_so_a_long_request_still_ends_at_the_context(engine, lively_checkpoint):
    """A server still starting answers 503 to everything (the context read included); once the real server runs
    on that port, a request past the context ends with finish reason length instead of the server's 400."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    starting = []

    def answer_starting():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            starting.append(connection.recv(65536).split(b"\r\n", 1)[0])
            connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\nConnection: close\r\n\r\n"
                               b"starting")
            connection.close()

    threading.Thread(target=answer_starting, daemon=True).start()
    ids = engine.tokenizer.encode("count on " * 200, add_special_tokens=False)[: engine.context_len - 3]
    client = HttpEngineClient(f"http://127.0.0.1:{port}")

    async def go():
        with pytest.raises(EngineHTTPError, match="503"):
            await client.generate(request(ids, 10))
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(), so the port is free again
        listener.close()
        server = start_server(engine, lively_checkpoint, port=port)
        try:
            return await client.generate(request(ids, 10))
        finally:
            await client.aclose()
            server.stop()

    result = run(go())
    assert starting == [b"GET /v1/models HTTP/1.1", b"POST /generate HTTP/1.1"]
    assert result.finish_reason is FinishReason.LENGTH and len(result.output_ids) == 3  # the room the prompt left
