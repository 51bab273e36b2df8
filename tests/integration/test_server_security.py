"""Who may call the engine server and the agent gateway, and how much one caller may ask: API keys and the admin
key on real servers on 127.0.0.1 (httpx, the official openai client, our HTTP engine client), the refusal to listen
beyond loopback without a key, bounded bodies, batches, prompts and queue, and the weight roots of
/update_weights_from_disk. The engine is the real one, on the tiny lively checkpoint (CPU)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from sluice.cli import main, parse_serve_args
from sluice.config import ConfigError, config_to_dict, parse_config
from sluice.engine.clients.http import EngineHTTPError, HttpEngineClient
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import GenerateRequest
from sluice.engine.server.app import BackgroundServer
from sluice.engine.server.context import ServerContext
from sluice.net.auth import ApiKeys, is_loopback
from sluice.net.listener import bind_listener
from sluice.rollout.gateway import AgentGateway
from sluice.types import SamplingParams
from helpers.servers import CPU

USER_KEY = "user-key-0123456789"
ADMIN_KEY = "admin-key-9876543210"
CONTROL_ROUTES = [  # every one refused before it reads its body, so an empty body is enough to tell
    ("POST", "/pause_generation"), ("POST", "/continue_generation"), ("POST", "/abort_request"),
    ("POST", "/flush_cache"), ("POST", "/release_memory_occupation"), ("POST", "/resume_memory_occupation"),
    ("POST", "/update_weights_from_disk"), ("POST", "/init_weights_update_group"),
    ("POST", "/update_weights_from_distributed"), ("POST", "/update_weights_from_tensor"),
    ("POST", "/destroy_weights_update_group"), ("GET", "/get_weights_checksum"),
]
GENERATION_ROUTES = [("POST", "/generate"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                     ("GET", "/v1/models"), ("GET", "/get_model_info"), ("GET", "/get_server_info")]


def serve(engine, checkpoint: str, **settings) -> BackgroundServer:
    return BackgroundServer(ServerContext(engine, checkpoint, "lively", replace(CPU, **settings))).start()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def greedy(ids: list[int], num_tokens: int = 4) -> dict:
    return {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": num_tokens, "ignore_eos": True}}


@pytest.fixture(scope="module")
def keyed(engine, lively_checkpoint):
    """A server with a user key and an admin key."""
    server = serve(engine, lively_checkpoint, api_key=USER_KEY, admin_api_key=ADMIN_KEY)
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize("method, path", GENERATION_ROUTES + CONTROL_ROUTES)
def test_without_a_key_every_route_but_health_is_401(keyed, method, path):
    for headers in ({}, bearer("wrong-key"), {"Authorization": f"Basic {USER_KEY}"}):
        response = httpx.request(method, keyed.url + path, headers=headers, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert USER_KEY not in response.text and ADMIN_KEY not in response.text
    assert httpx.get(keyed.url + "/health").status_code == 200


@pytest.mark.parametrize("method, path", CONTROL_ROUTES)
def test_the_user_key_gets_403_on_control_routes(keyed, method, path):
    response = httpx.request(method, keyed.url + path, headers=bearer(USER_KEY), timeout=30)
    assert response.status_code == 403 and "admin API key" in response.json()["error"]["message"]


def test_the_user_key_generates_and_the_admin_key_controls(keyed, engine):
    ids = engine.tokenizer.encode("what is 2+2?")
    for key in (USER_KEY, ADMIN_KEY):  # the admin key opens generation too
        response = httpx.post(keyed.url + "/generate", json=greedy(ids), headers=bearer(key), timeout=60)
        assert response.status_code == 200 and len(response.json()["output_ids"]) == 4
    admin = bearer(ADMIN_KEY)
    assert httpx.post(keyed.url + "/pause_generation", headers=admin, json={}).status_code == 200
    assert httpx.post(keyed.url + "/continue_generation", headers=admin, json={}).status_code == 200
    assert httpx.post(keyed.url + "/flush_cache", headers=admin).status_code == 200
    assert httpx.post(keyed.url + "/abort_request", headers=admin, json={"abort_all": True}).status_code == 200
    assert httpx.get(keyed.url + "/get_weights_checksum", headers=admin, timeout=60).status_code == 200


def test_without_an_admin_key_the_api_key_opens_control_routes(engine, lively_checkpoint):
    server = serve(engine, lively_checkpoint, api_key=USER_KEY)
    try:
        assert httpx.post(server.url + "/flush_cache").status_code == 401
        assert httpx.post(server.url + "/flush_cache", headers=bearer(USER_KEY)).status_code == 200
    finally:
        server.stop()


def test_the_openai_client_and_our_engine_client_send_the_key(keyed, engine):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=USER_KEY, max_retries=0)
    reply = client.completions.create(model="lively", prompt="hi", max_tokens=3, temperature=0)
    assert len(reply.choices[0].token_ids) <= 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()

    async def calls(key: str):
        http, admin = HttpEngineClient(keyed.url, api_key=key), HttpEngineClient(keyed.url, api_key=ADMIN_KEY)
        try:
            result = await http.generate(GenerateRequest(engine.tokenizer.encode("hi"), SamplingParams(
                temperature=0.0, max_new_tokens=3, ignore_eos=True)))
            try:
                await http.pause()
            finally:
                await admin.resume()
            return result
        finally:
            await http.aclose()
            await admin.aclose()

    assert len(asyncio.run(calls(ADMIN_KEY)).output_ids) == 3
    with pytest.raises(EngineHTTPError) as refused:
        asyncio.run(calls(USER_KEY))  # generates, then is refused the pause
    assert refused.value.status == 403


def test_keys_are_never_recorded_or_shown():
    config = parse_config(["--sglang-api-key", USER_KEY, "--sglang-admin-api-key", ADMIN_KEY])
    recorded = config_to_dict(config)
    assert recorded["sglang_api_key"] is None and recorded["sglang_admin_api_key"] is None
    assert USER_KEY not in repr(config) and ADMIN_KEY not in repr(ApiKeys(USER_KEY, ADMIN_KEY))


# ------------------------------------------------------------------------------------------------ exposure
def test_listening_beyond_loopback_needs_a_key(engine, lively_checkpoint, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    ctx = ServerContext(engine, lively_checkpoint, "lively", CPU)
    with pytest.raises(ConfigError, match="without an API key.*--api-key.*--allow-unauthenticated"):
        BackgroundServer(ctx, host="0.0.0.0")
    for opened in (BackgroundServer(ctx, host="0.0.0.0", allow_unauthenticated=True),
                   BackgroundServer(ServerContext(engine, lively_checkpoint, "lively", replace(CPU, api_key="k")),
                                    host="0.0.0.0")):
        opened.listener.close()
    # `sluice serve` refuses before it loads the model
    assert main(["serve", "--model", lively_checkpoint, "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    args = parse_serve_args(["--model", "/m", "--host", "0.0.0.0", "--api-key", USER_KEY, "--admin-api-key",
                             ADMIN_KEY, "--allow-unauthenticated"])
    assert (args.engine.api_key, args.engine.admin_api_key, args.allow_unauthenticated) == (USER_KEY, ADMIN_KEY, True)
    with pytest.raises(ConfigError, match="--sglang-api-key must be a non-empty key without spaces"):
        parse_serve_args(["--model", "/m", "--api-key", "two words"])
    with pytest.raises(ConfigError, match="without an API key"):
        AgentGateway(InProcessClient(engine), engine.tokenizer, engine.context_len, host="0.0.0.0")


def test_a_busy_port_is_refused_before_the_model_loads(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:  # the model path does not exist: the port must be checked first
        assert main(["serve", "--model", str(tmp_path / "absent"), "--port", str(port)]) == 2
        with pytest.raises(ConfigError, match=f"the agent gateway: cannot listen on 127.0.0.1:{port}"):
            bind_listener("127.0.0.1", port, "the agent gateway")
    finally:
        taken.close()
    assert f"--host 127.0.0.1 --port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_the_gateway_checks_its_key(engine):
    gateway = AgentGateway(InProcessClient(engine), engine.tokenizer, engine.context_len, api_key=USER_KEY).start()
    try:
        session = gateway.open_session(SamplingParams(temperature=0.0, max_new_tokens=3), 3)
        assert gateway.agent_api_key == USER_KEY
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gateway.base_url(session), api_key="wrong", max_retries=0).chat.completions.create(
                model="policy", messages=messages)
        client = openai.OpenAI(base_url=gateway.base_url(session), api_key=gateway.agent_api_key, max_retries=0)
        assert len(client.chat.completions.create(model="policy", messages=messages).choices[0].token_ids) <= 3
        assert httpx.post(gateway.url + "/generate", json={"text": "hi"}).status_code == 401
        huge = httpx.post(gateway.url + "/generate", headers=bearer(USER_KEY), content=b"x" * (65 * 2**20))
        assert huge.status_code == 413
        gateway.close_session(session)
    finally:
        gateway.stop()


# ------------------------------------------------------------------------------------------------ limits
@pytest.fixture(scope="module")
def bounded(engine, lively_checkpoint):
    server = serve(engine, lively_checkpoint, max_request_body_mb=0.01, max_prompts_per_request=2,
                   max_prompt_tokens=8, max_queued_requests=2)
    yield server
    server.stop()


def test_an_oversized_body_gets_413_and_the_server_keeps_serving(bounded, engine):
    ids = engine.tokenizer.encode("hi")
    padded = greedy(ids) | {"rid": "x" * 20_000}
    declared = httpx.post(bounded.url + "/generate", json=padded)
    assert declared.status_code == 413 and "--sglang-max-request-body-mb" in declared.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 1024

    streamed = httpx.post(bounded.url + "/generate", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert httpx.post(bounded.url + "/generate", json=greedy(ids), timeout=60).status_code == 200


def test_oversized_batches_and_prompts_get_400_naming_the_limit(bounded, engine):
    ids = engine.tokenizer.encode("hi")
    batch = httpx.post(bounded.url + "/generate", json=greedy([ids, ids, ids]))
    assert batch.status_code == 400 and "--sglang-max-prompts-per-request" in batch.json()["error"]["message"]
    choices = httpx.post(bounded.url + "/v1/completions", json={"model": "m", "prompt": "hi", "n": 3})
    assert choices.status_code == 400 and "limit is 2" in choices.json()["error"]["message"]
    long = httpx.post(bounded.url + "/generate", json=greedy(list(range(9))))
    assert long.status_code == 400 and "--sglang-max-prompt-tokens" in long.json()["error"]["message"]
    assert long.json()["error"]["param"] == "input_ids"
    assert httpx.post(bounded.url + "/generate", json=greedy([ids, ids]), timeout=60).status_code == 200


async def generate_over_http(url: str, ids: list[int]) -> list[int]:
    client = HttpEngineClient(url)
    try:
        request = GenerateRequest(ids, SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))
        return (await client.generate(request)).output_ids
    finally:
        await client.aclose()


def test_a_full_queue_gets_503_with_retry_after_and_drains(bounded, engine):
    ids = engine.tokenizer.encode("hi")
    engine.pause()  # requests wait in the queue until resumed
    answers: list[int] = []  # the queued requests' statuses, in whatever order their threads finish
    retried_tokens: list[int] = []
    waiting = [threading.Thread(target=lambda: answers.append(
        httpx.post(bounded.url + "/generate", json=greedy(ids), timeout=60).status_code)) for _ in range(2)]
    try:
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 30
        while engine.load()["num_waiting"] < 2:
            assert time.monotonic() < deadline, "the two requests never reached the queue"
            time.sleep(0.01)
        full = httpx.post(bounded.url + "/generate", json=greedy(ids), timeout=30)
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        assert "--sglang-max-queued-requests" in full.json()["error"]["message"]
        # our engine client waits as Retry-After says and tries again: it gets through once the queue drains
        retried = threading.Thread(
            target=lambda: retried_tokens.append(len(asyncio.run(generate_over_http(bounded.url, ids)))))
        retried.start()
        time.sleep(1.5)
    finally:
        engine.resume()
    for thread in [*waiting, retried]:
        thread.join(timeout=60)
    assert answers == [200, 200] and retried_tokens == [2]
    assert httpx.post(bounded.url + "/generate", json=greedy(ids), timeout=60).status_code == 200


# ------------------------------------------------------------------------------------------------ weight roots
def test_weights_load_only_from_the_allowed_roots(keyed, lively_checkpoint):
    admin = bearer(ADMIN_KEY)
    before = httpx.get(keyed.url + "/get_weights_checksum", headers=admin, timeout=60).json()
    outside = tempfile.mkdtemp(prefix="sluice-outside-")  # not under the checkpoint's parent
    sneaky = str(Path(lively_checkpoint).parent / ".." / ".." / Path(outside).name)
    for path in (outside, sneaky, "/etc"):
        refused = httpx.post(keyed.url + "/update_weights_from_disk", headers=admin, timeout=60,
                             json={"model_path": path, "weight_version": str(int(before["weight_version"]) + 1)})
        message = refused.json()["error"]["message"]
        assert refused.status_code == 403 and str(Path(lively_checkpoint).parent) in message, message
    after = httpx.get(keyed.url + "/get_weights_checksum", headers=admin, timeout=60).json()
    assert after == before  # same version, same bytes
    Path(outside).rmdir()


def test_weight_load_dirs_add_roots(engine, lively_checkpoint, lively_checkpoint_other):
    """A checkpoint in a directory of its own loads once that directory is a root (a run adds its weight-sync and
    checkpoint directories the same way)."""
    root = Path(tempfile.mkdtemp(prefix="sluice-root-"))
    copied = str(shutil.copytree(lively_checkpoint_other, root / "other"))
    closed, opened = serve(engine, lively_checkpoint), serve(engine, lively_checkpoint, weight_load_dirs=[str(root)])
    try:
        version = int(httpx.get(opened.url + "/get_weight_version").json()["weight_version"])
        body = {"model_path": copied, "weight_version": str(version + 1)}
        assert httpx.post(closed.url + "/update_weights_from_disk", json=body, timeout=60).status_code == 403
        loaded = httpx.post(opened.url + "/update_weights_from_disk", json=body, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["success"] is True
    finally:
        httpx.post(opened.url + "/update_weights_from_disk", timeout=60,
                   json={"model_path": lively_checkpoint, "weight_version": str(version + 2)})
        closed.stop()
        opened.stop()
        shutil.rmtree(root)
