"""`sluice serve`'s HTTP API against real servers on 127.0.0.1: SGLang's native endpoints, the OpenAI-compatible
ones through the official openai client, weight updates from disk and by a gloo broadcast, and sglang-router in
front of two `sluice serve` processes. The engine is the real one, on the tiny lively checkpoint (CPU)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sluice.cli import parse_serve_args
from sluice.config import ConfigError
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import GenerateRequest
from sluice.types import SamplingParams
from sluice.weights.process_group import join_weight_group, send_weights

from helpers.servers import free_port, free_ports

PROMPTS = ["hi", "what is 2+2?", "reverse 12345 please"]


# ------------------------------------------------------------------------------------------------ fixtures
def greedy_body(prompt_ids: list[int], num_tokens: int = 8, **extra) -> dict:
    params = {"temperature": 0, "max_new_tokens": num_tokens, "ignore_eos": True, **extra.pop("params", {})}
    return {"input_ids": prompt_ids, "sampling_params": params, "return_logprob": True, **extra}


def in_process(engine, prompt_ids: list[int], num_tokens: int = 8, **params):
    """The same request through the in-process client: the reference for what HTTP must return."""
    sampling = SamplingParams(temperature=0.0, max_new_tokens=num_tokens, ignore_eos=True, **params)
    return asyncio.run(InProcessClient(engine).generate(GenerateRequest(prompt_ids, sampling)))


@torch.no_grad()
def hf_greedy(checkpoint: str, prompt_ids: list[int], num_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out: list[int] = []
    for _ in range(num_tokens):
        out.append(int(model(input_ids=torch.tensor([prompt_ids + out])).logits[0, -1].argmax()))
    return out


def sse_payloads(response: httpx.Response) -> list:
    """The ``data:`` payloads of a server-sent-events body, "[DONE]" kept as a string."""
    payloads = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def next_version(http) -> int:
    return int(http.get("/get_weight_version").json()["weight_version"]) + 1


# ------------------------------------------------------------------------------------------------ endpoints
def test_info_endpoints(http, engine, lively_checkpoint):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    for path in ("/get_model_info", "/model_info"):
        info = http.get(path).json()
        assert info["model_path"] == lively_checkpoint and info["is_generation"] is True
    for path in ("/get_server_info", "/server_info"):
        info = http.get(path).json()
        assert info["context_length"] == engine.context_len and info["served_model_name"] == "lively"
    load = http.get("/get_load").json()
    assert load[0]["num_reqs"] == 0 and load[0]["num_waiting_reqs"] == 0
    assert http.get("/get_weight_version").json() == {"weight_version": str(engine.weight_version)}
    assert http.get("/v1/models").json()["data"][0]["id"] == "lively"
    assert http.get("/flush_cache").status_code == 200
    assert http.post("/flush_cache").status_code == 200


def test_greedy_generate_equals_in_process_engine(http, engine, lively_checkpoint):
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        body = http.post("/generate", json=greedy_body(ids)).json()
        reference = in_process(engine, ids)
        assert body["output_ids"] == reference.output_ids
        assert body["text"] == reference.text
        logprobs = [triple[0] for triple in body["meta_info"]["output_token_logprobs"]]
        assert logprobs == pytest.approx(reference.output_logprobs, abs=1e-5)
        assert [triple[1] for triple in body["meta_info"]["output_token_logprobs"]] == reference.output_ids
        meta = body["meta_info"]
        assert meta["finish_reason"]["type"] == "length" and meta["prompt_tokens"] == len(ids)
        assert meta["completion_tokens"] == 8 and meta["weight_version"] == str(engine.weight_version)
    ids = engine.tokenizer.encode(PROMPTS[0])
    assert hf_greedy(lively_checkpoint, ids, 8) == http.post("/generate", json=greedy_body(ids)).json()["output_ids"]
    by_text = http.post("/generate", json={"text": PROMPTS[0], "sampling_params": greedy_body(ids)["sampling_params"]})
    assert by_text.json()["output_ids"] == in_process(engine, ids).output_ids


def test_batch_generate_keeps_order(http, engine):
    params = greedy_body([1])["sampling_params"]
    batch = http.post("/generate", json={"text": PROMPTS, "sampling_params": params, "rid": ["a", "b", "c"]}).json()
    assert [out["meta_info"]["id"] for out in batch] == ["a", "b", "c"]
    for prompt, out in zip(PROMPTS, batch):
        assert out["output_ids"] == in_process(engine, engine.tokenizer.encode(prompt)).output_ids


def test_stop_string_and_no_stop_trim(http, engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    full = in_process(engine, ids, 12).text
    stop = full[4:6]
    cut = full.index(stop)
    body = http.post("/generate", json=greedy_body(ids, 12, params={"stop": [stop]})).json()
    assert body["text"] == full[:cut] and body["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = http.post("/generate", json=greedy_body(ids, 12, params={"stop": stop, "no_stop_trim": True})).json()
    assert kept["text"] == full[: cut + len(stop)]


def test_stream_builds_up_to_the_plain_result(http, engine):
    ids = engine.tokenizer.encode(PROMPTS[2])
    full = in_process(engine, ids, 12).text
    stop = full[6:8]
    body = greedy_body(ids, 12, params={"stop": [stop]})
    plain = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        chunks = sse_payloads(response)
    assert chunks[-1] == "[DONE]"
    final, partial = chunks[-2], chunks[:-2]
    assert final["output_ids"] == plain["output_ids"] and final["text"] == plain["text"]
    assert final["meta_info"]["finish_reason"] == plain["meta_info"]["finish_reason"]
    assert [len(c["output_ids"]) for c in partial] == list(range(1, len(plain["output_ids"]) + 1))
    for chunk in partial:  # cumulative (SGLang's default): every chunk extends the previous one
        assert plain["output_ids"][: len(chunk["output_ids"])] == chunk["output_ids"]
        assert plain["text"].startswith(chunk["text"])  # the stop string is held back, never shown then cut
        assert chunk["meta_info"]["finish_reason"] is None


@pytest.mark.parametrize("path, body, field", [
    ("/generate", "{not json", "not valid JSON"),
    ("/generate", "[1, 2]", "JSON object"),
    ("/generate", {"text": "hi", "sampling_params": {"temprature": 0.5}}, "sampling_params.temprature"),
    ("/generate", {"text": "hi", "sampling_params": {"top_p": "high"}}, "sampling_params.top_p"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"repetition_penalty": 1.3}}, "sampling_params.repetition_penalty"),
    ("/generate", {"text": "hi", "input_ids": [5]}, "text or input_ids"),
    ("/generate", {"sampling_params": {}}, "text or input_ids"),
    ("/generate", {"input_ids": []}, "input_ids"),
    ("/generate", {"text": ""}, "text"),
    ("/generate", {"input_ids": [5, 100000]}, "100000"),
    ("/generate", {"input_ids": [5, "a"]}, "input_ids[1]"),
    ("/generate", {"input_ids": [5], "return_logprob": "yes"}, "return_logprob"),
    ("/generate", {"input_ids": [5], "unknown_key": 1}, "unknown_key"),
    ("/generate", {"input_ids": [5] * 600}, "context length"),
    ("/generate", {"text": ["a", "b"], "stream": True}, "stream"),
    ("/abort_request", {}, "rid"),
    ("/update_weights_from_disk", {}, "model_path"),
    ("/update_weights_from_disk", {"model_path": "/x", "weight_version": "v2"}, "weight_version"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]]}, "group_name"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 3,
                                    "world_size": 2}, "rank_offset"),
    ("/v1/completions", {"model": "m", "prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"model": "m", "prompt": [], "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
])
def test_malformed_requests_get_400_naming_the_field(http, engine, path, body, field):
    content = body if isinstance(body, str) else json.dumps(body)
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]
    # the server is still up and serving
    ids = engine.tokenizer.encode("ok")
    assert http.post("/generate", json=greedy_body(ids, 2)).json()["output_ids"] == in_process(engine, ids, 2).output_ids


# ------------------------------------------------------------------------------------------------ control
def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def start_generate(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """A /generate in a background thread; its JSON lands in the returned dict under "body"."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(body=httpx.post(url + "/generate", json=body, timeout=60).json()))
    thread.start()
    return thread, out


def test_abort_returns_partial_output(http, server, engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    thread, out = start_generate(server.url, greedy_body(ids, 480, rid="to-abort"))
    wait_until(lambda: http.get("/get_load").json()[0]["num_reqs"] == 1)
    engine.pause()  # after the step under way: the request cannot reach its 480th token before the abort
    try:
        assert http.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
        thread.join(timeout=30)  # an aborted request is answered while the engine is paused
    finally:
        engine.resume()
    assert not thread.is_alive()
    meta = out["body"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["id"] == "to-abort"
    assert 0 < len(out["body"]["output_ids"]) < 480
    assert out["body"]["output_ids"] == in_process(engine, ids, len(out["body"]["output_ids"])).output_ids


def test_closing_a_stream_aborts_its_request(http, engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    decoded_before = engine.stats.num_decode_tokens
    try:
        with http.stream("POST", "/generate", json={**greedy_body(ids, 480), "stream": True}) as response:
            for number, _ in enumerate(response.iter_lines()):
                if number == 4:
                    engine.pause()  # the request cannot end by itself now: only the abort can remove it
                    break  # the client goes away after two chunks
        wait_until(lambda: http.get("/get_load").json()[0]["load"] == 0)
    finally:
        engine.resume()
    # aborted, not decoded to the end for nobody: far fewer than the 479 decode steps of a full run
    assert engine.stats.num_decode_tokens - decoded_before < 240, engine.stats.num_decode_tokens - decoded_before


def test_pause_in_place_holds_and_continue_finishes(http, server, engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    thread, out = start_generate(server.url, greedy_body(ids, 6))
    wait_until(lambda: http.get("/get_load").json()[0]["load"] == 1)
    time.sleep(0.2)
    assert thread.is_alive() and http.get("/health").status_code == 200
    assert http.post("/continue_generation").status_code == 200
    thread.join(timeout=30)
    assert out["body"]["output_ids"] == in_process(engine, ids, 6).output_ids


def test_pause_default_mode_aborts_running_requests(http, server, engine):
    ids = engine.tokenizer.encode(PROMPTS[2])
    thread, out = start_generate(server.url, greedy_body(ids, 480))
    wait_until(lambda: http.get("/get_load").json()[0]["num_reqs"] == 1)
    engine.pause()  # in place, after the step under way: the request is still running when the pause below comes
    assert http.post("/pause_generation", json={}).status_code == 200
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert out["body"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert http.post("/continue_generation").status_code == 200
    assert http.post("/generate", json=greedy_body(ids, 3)).json()["output_ids"] == in_process(engine, ids, 3).output_ids


def test_release_and_resume_memory(http, engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    before = http.post("/generate", json=greedy_body(ids)).json()["output_ids"]
    assert http.post("/release_memory_occupation", json={}).status_code == 200
    assert http.post("/resume_memory_occupation").status_code == 200
    assert http.post("/generate", json=greedy_body(ids)).json()["output_ids"] == before


# ------------------------------------------------------------------------------------------------ weights
def test_update_weights_from_disk(http, engine, lively_checkpoint, lively_checkpoint_other):
    ids = engine.tokenizer.encode(PROMPTS[1])
    before = http.post("/generate", json=greedy_body(ids)).json()["output_ids"]
    version = next_version(http)
    missing = str(Path(lively_checkpoint).parent / "no_such_dir")  # inside the allowed roots, but not there
    failed = http.post("/update_weights_from_disk", json={"model_path": missing, "weight_version": str(version)})
    assert failed.status_code == 400 and failed.json()["success"] is False
    assert http.get("/get_weight_version").json()["weight_version"] == str(version - 1)
    try:
        done = http.post("/update_weights_from_disk", json={"model_path": lively_checkpoint_other,
                                                            "weight_version": str(version)})
        assert done.status_code == 200 and done.json()["success"] is True
        assert http.get("/get_weight_version").json()["weight_version"] == str(version)
        after = http.post("/generate", json=greedy_body(ids)).json()
        assert after["meta_info"]["weight_version"] == str(version)
        assert after["output_ids"] != before
        assert after["output_ids"] == hf_greedy(lively_checkpoint_other, ids, 8)
    finally:
        http.post("/update_weights_from_disk", json={"model_path": lively_checkpoint, "weight_version": str(version + 1)})
    assert http.post("/generate", json=greedy_body(ids)).json()["output_ids"] == before


def test_update_weights_by_gloo_broadcast(http, server, engine, lively_checkpoint, lively_checkpoint_other):
    """The test process is the trainer (rank 0): it hosts the group and broadcasts every tensor in order."""
    ids = engine.tokenizer.encode(PROMPTS[0])
    before = http.post("/generate", json=greedy_body(ids)).json()["output_ids"]
    weights = load_file(str(Path(lively_checkpoint_other) / "model.safetensors"))
    port, version = free_port(), next_version(http)
    init = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": "test_sync", "backend": "gloo"}
    update = {"names": list(weights), "dtypes": [str(t.dtype) for t in weights.values()],
              "shapes": [list(t.shape) for t in weights.values()], "group_name": "test_sync",
              "weight_version": str(version)}
    with ThreadPoolExecutor(1) as pool:
        joined = pool.submit(httpx.post, server.url + "/init_weights_update_group", json=init, timeout=60)
        group = join_weight_group("127.0.0.1", port, 0, 2, "test_sync", "gloo", timeout=timedelta(seconds=60))
        assert joined.result(timeout=60).json()["success"] is True
        updated = pool.submit(httpx.post, server.url + "/update_weights_from_distributed", json=update, timeout=60)
        send_weights(group, weights)
        assert updated.result(timeout=60).json()["success"] is True
    try:
        after = http.post("/generate", json=greedy_body(ids)).json()
        assert after["meta_info"]["weight_version"] == str(version)
        assert after["output_ids"] == hf_greedy(lively_checkpoint_other, ids, 8) != before
    finally:
        http.post("/update_weights_from_disk", json={"model_path": lively_checkpoint, "weight_version": str(version + 1)})
        assert http.post("/destroy_weights_update_group", json={"group_name": "test_sync"}).status_code == 200
    assert http.post("/generate", json=greedy_body(ids)).json()["output_ids"] == before


# ------------------------------------------------------------------------------------------------ OpenAI
def test_openai_chat_completions(openai_client, engine):
    messages = [{"role": "user", "content": "add 3 and 4"}]
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True),
                                     add_special_tokens=False)
    reference = in_process(engine, prompt, 6)
    reply = openai_client.chat.completions.create(model="lively", messages=messages, max_tokens=6, temperature=0,
                                                  logprobs=True, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.message.content == reference.text and choice.finish_reason == "length"
    assert choice.token_ids == reference.output_ids and reply.prompt_token_ids == prompt
    assert [entry.logprob for entry in choice.logprobs.content] == pytest.approx(reference.output_logprobs, abs=1e-5)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 6
    stream = openai_client.chat.completions.create(model="lively", messages=messages, max_tokens=6, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert [t for c in chunks for t in (c.choices[0].token_ids or [])] == reference.output_ids
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_completions(openai_client, engine):
    ids = engine.tokenizer.encode(PROMPTS[2])
    reference = in_process(engine, ids, 5)
    reply = openai_client.completions.create(model="lively", prompt=PROMPTS[2], max_tokens=5, temperature=0,
                                             logprobs=0, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.text == reference.text and choice.token_ids == reference.output_ids
    assert choice.logprobs.token_logprobs == pytest.approx(reference.output_logprobs, abs=1e-5)
    sampled = openai_client.completions.create(model="lively", prompt=[ids, ids], max_tokens=5, n=2, seed=3,
                                               temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    again = openai_client.completions.create(model="lively", prompt=[ids, ids], max_tokens=5, n=2, seed=3,
                                             temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in sampled.choices]  # seeded
    stream = openai_client.completions.create(model="lively", prompt=PROMPTS[2], max_tokens=5, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream) == reference.text


# ------------------------------------------------------------------------------------------------ CLI + router
def test_serve_flags_come_from_the_engine_config():
    args = parse_serve_args(["--model", "/m", "--port", "0", "--sglang-mem-fraction-static", "0.5",
                             "--sglang-max-running-requests", "7"])
    assert (args.model_path, args.port, args.engine.mem_fraction_static, args.engine.max_running_requests) == \
        ("/m", 0, 0.5, 7)
    with pytest.raises(ConfigError, match="--lr"):
        parse_serve_args(["--model", "/m", "--lr", "1e-6"])
    with pytest.raises(ConfigError, match="--sglang-mem-fraction-statc"):
        parse_serve_args(["--model", "/m", "--sglang-mem-fraction-statc", "0.5"])
    with pytest.raises(ConfigError, match="--model"):
        parse_serve_args(["--port", "1"])


def spawn(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def serve_url(process: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """The URL `sluice serve` prints once it listens (it loads the model first)."""
    found: dict = {}

    def read() -> None:
        for line in process.stdout:
            if line.startswith("sluice serve:"):
                found["url"] = line.split(" at ")[-1].strip()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert "url" in found, f"sluice serve did not start (exit code {process.poll()})"
    return found["url"]


def test_sglang_router_in_front_of_two_keyed_servers(engine, lively_checkpoint):
    """The router's --api-key is the key it sends its workers, and the key it asks of its own callers."""
    key = "router-and-workers-key"
    serve = [sys.executable, "-m", "sluice.cli", "serve", "--model", lively_checkpoint, "--port", "0",
             "--sglang-device", "cpu", "--sglang-dtype", "float32", "--api-key", key]
    auth = {"Authorization": f"Bearer {key}"}
    workers = [spawn(serve), spawn(serve)]
    router = None
    try:
        urls = [serve_url(worker) for worker in workers]
        port, prometheus_port = free_ports(2)
        router = spawn([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls,
                        "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(prometheus_port),
                        "--log-level", "warn", "--api-key", key])
        ids = engine.tokenizer.encode(PROMPTS[1])
        body = greedy_body(ids, 6)
        deadline = time.monotonic() + 60
        while True:  # the router registers workers in the background after it starts listening
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=30, headers=auth)
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and router.poll() is None, "sglang-router never served /generate"
            time.sleep(0.2)
        assert response.json()["output_ids"] == in_process(engine, ids, 6).output_ids
        chat = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key).chat.completions.create(
            model=lively_checkpoint, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert len(chat.choices[0].token_ids) <= 3
        assert httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=30).status_code == 401
        for url in urls:  # and the workers themselves refuse a caller without the key
            assert httpx.post(f"{url}/generate", json=body, timeout=30).status_code == 401
    finally:
        for process in [router, *workers]:
            if process is not None:
                process.terminate()
        for process in [router, *workers]:
            if process is not None:
                process.wait(timeout=30)
