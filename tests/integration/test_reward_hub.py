"""The reward hub: each built-in on known answers (math-verify equivalences), the docstring examples, the
boxed_ prefix, --reward-key on dict rewards, and remote_rm against a real HTTP server on 127.0.0.1 (retries with
backoff, no retry of a 4xx, timeouts, bounded connections)."""

from __future__ import annotations

import asyncio
import doctest
import importlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sluice.rewards import BUILTIN_REWARDS, RemoteReward, RewardSettings, builtin_reward, get_reward_fn
from sluice.rewards.remote import RemoteRewardError
from sluice.types import Sample

REWARD_MODULES = ["exact", "math", "boxed", "f1", "deepscaler", "random_rm", "remote"]


@pytest.mark.parametrize("module", REWARD_MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"sluice.rewards.{module}"))
    assert result.attempted > 0 and result.failed == 0


def score(rm_type: str, response: str, label, **settings) -> float:
    fn = builtin_reward(rm_type, RewardSettings(**settings))
    return asyncio.run(fn(Sample(prompt="q", response=response, label=label)))


@pytest.mark.parametrize(("response", "label"), [
    ("$\\frac{1}{2}$", "0.5"), ("0.5", "1/2"), ("1/2", "\\frac{1}{2}"), ("The answer is $0.5$.", "\\frac12"),
    ("so x = \\boxed{\\frac{2}{4}}", "0.5"), ("$50\\%$", "0.5"), ("$x^2+2x+1$", "(x+1)^2"),
])
def test_math_equivalent_forms_score_one(response, label):
    assert score("math", response, label) == 1.0


@pytest.mark.parametrize(("response", "label"), [("$\\frac{1}{3}$", "0.5"), ("0.55", "1/2"), ("", "0.5"),
                                                 ("no number here", "0.5")])
def test_math_wrong_answers_score_zero(response, label):
    assert score("math", response, label) == 0.0


@pytest.mark.parametrize(("rm_type", "response", "label", "expected"), [
    ("exact", " 42\n", 42, 1.0), ("exact", "42.0", 42, 0.0),
    ("boxed_exact", "so \\boxed{42}", "42", 1.0), ("boxed_exact", "42", "42", 0.0),
    ("boxed_math", "first 0.3 then \\boxed{1/2}", "0.5", 1.0), ("boxed_math", "0.5", "0.5", 0.0),
    ("f1", "the Eiffel Tower", "Eiffel Tower", 1.0), ("f1", "Tower in Paris", "Eiffel Tower", 0.4),
    ("f1", "Rome", "Paris", 0.0), ("boxed_f1", "\\boxed{eiffel tower!}", "Eiffel Tower", 1.0),
    ("deepscaler", "<think>maybe 1/3</think> \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("deepscaler", "<think>it is 0.5", "0.5", 0.0), ("deepscaler", "0.5", "0.5", 0.0),
])
def test_builtin_rewards_on_known_answers(rm_type, response, label, expected):
    assert score(rm_type, response, label) == pytest.approx(expected)


def test_every_builtin_is_registered_and_named_in_the_config():
    from sluice.config.sections import BUILTIN_REWARDS as CONFIG_NAMES

    assert BUILTIN_REWARDS == CONFIG_NAMES
    assert set(BUILTIN_REWARDS) >= {"exact", "math", "f1", "deepscaler", "boxed_exact", "boxed_math", "remote_rm",
                                    "random"}
    with pytest.raises(ValueError, match="unknown --rm-type 'boxed_deepscaler'"):
        builtin_reward("boxed_deepscaler")


def test_random_reward_is_seeded_and_order_free():
    samples = [Sample(prompt="q", index=i, response=f"r{i}") for i in range(64)]
    first = builtin_reward("random", RewardSettings(seed=3))
    again = builtin_reward("random", RewardSettings(seed=3))
    other = builtin_reward("random", RewardSettings(seed=4))

    async def all_of(fn, order):
        return {s.index: await fn(s) for s in order}

    forward = asyncio.run(all_of(first, samples))
    assert forward == asyncio.run(all_of(again, list(reversed(samples))))
    assert forward != asyncio.run(all_of(other, samples))
    assert 16 < sum(forward.values()) < 48 and set(forward.values()) == {0.0, 1.0}


def test_reward_key_picks_a_field_of_a_dict_reward():
    fn = get_reward_fn(None, "examples.plugins.rewards.scored_dict")
    sample = Sample(prompt="q", label="7", response="7", response_length=1)
    sample.reward = asyncio.run(fn(sample))
    assert sample.reward == {"acc": 1.0, "length": 1.0}
    assert sample.scalar_reward("acc") == 1.0 and sample.scalar_reward("length") == 1.0
    with pytest.raises(ValueError, match="set --reward-key"):
        sample.scalar_reward(None)


# ---- remote_rm against a real server --------------------------------------------------------------------
class RewardServer:
    """A reward service on 127.0.0.1: /score grades exact match; /flaky fails twice per sample first; /bad
    refuses; /slow answers only when the server closes; every request is counted, and the peak of concurrent ones
    kept."""

    def __init__(self):
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.requests: list[tuple[str, dict]] = []
        self.in_flight = self.peak = 0
        self.failures_left: dict[int, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with server.lock:
                    server.requests.append((self.path, body))
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                try:
                    status, payload = server.answer(self.path, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, path: str, body: dict) -> tuple[int, object]:
        right = float(body["response"] == body["label"])
        if path == "/score":
            time.sleep(0.05)
            return 200, {"score": right, "pred": body["response"], "prompt_len": len(body["prompt"])}
        if path == "/number":
            return 200, right
        if path == "/flaky":
            index = body["metadata"]["id"]
            with self.lock:
                left = self.failures_left.setdefault(index, 2)
                self.failures_left[index] = left - 1
            return (503, {"error": "busy"}) if left > 0 else (200, right)
        if path == "/bad":
            return 400, {"error": "bad request"}
        if path == "/slow":  # a client that waited for this answer would get it and raise nothing
            self.closing.wait(60)
            return 200, right
        return 404, {"error": "no such path"}

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def reward_server():
    server = RewardServer()
    yield server
    server.close()


def samples_for(n: int) -> list[Sample]:
    return [Sample(prompt=f"p{i}", index=i, response=str(i % 2), label="1", metadata={"id": i}) for i in range(n)]


def test_remote_reward_posts_the_sample_and_reads_numbers_or_dicts(reward_server):
    async def run():
        dict_reward = RemoteReward(reward_server.url + "/score")
        number_reward = RemoteReward(reward_server.url + "/number")
        samples = samples_for(4)
        return ([await dict_reward(s) for s in samples], [await number_reward(s) for s in samples])

    dicts, numbers = asyncio.run(run())
    assert dicts == [{"score": 0.0, "prompt_len": 2.0}, {"score": 1.0, "prompt_len": 2.0}] * 2  # "pred" is text
    assert numbers == [0.0, 1.0, 0.0, 1.0]
    path, body = reward_server.requests[0]
    assert path == "/score" and body == {"prompt": "p0", "response": "0", "label": "1", "metadata": {"id": 0}}


def test_remote_reward_retries_5xx_with_backoff_but_not_4xx(reward_server):
    flaky = RemoteReward(reward_server.url + "/flaky", max_retries=3, first_backoff_s=0.05)
    start = time.monotonic()
    assert asyncio.run(flaky(samples_for(2)[1])) == 1.0
    assert time.monotonic() - start >= 0.05 + 0.1  # two waits: 0.05 s, then 0.1 s
    assert len([p for p, _ in reward_server.requests if p == "/flaky"]) == 3

    too_few = RemoteReward(reward_server.url + "/flaky", max_retries=1, first_backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match="no usable answer after 2 attempts .*HTTP 503"):
        asyncio.run(too_few(samples_for(3)[2]))

    bad = RemoteReward(reward_server.url + "/bad", max_retries=3, first_backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match="answered HTTP 400"):
        asyncio.run(bad(samples_for(1)[0]))
    assert len([p for p, _ in reward_server.requests if p == "/bad"]) == 1


def test_remote_reward_times_out_and_retries(reward_server):
    slow = RemoteReward(reward_server.url + "/slow", timeout_s=0.1, max_retries=1, first_backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match="after 2 attempts .*Timeout"):  # two 0.1 s attempts, no answer
        asyncio.run(slow(samples_for(1)[0]))


def test_remote_reward_bounds_its_connections_and_serves_a_rollout(reward_server):
    reward = get_reward_fn("remote_rm", settings=RewardSettings(rm_url=reward_server.url + "/score",
                                                                 rm_max_connections=3))

    async def run():
        return await asyncio.gather(*(reward(s) for s in samples_for(12)))

    values = asyncio.run(run())
    assert [v["score"] for v in values] == [0.0, 1.0] * 6
    assert reward_server.peak <= 3 and reward_server.peak >= 2  # concurrent, within the bound
    unreachable = RemoteReward("http://127.0.0.1:9/score", max_retries=0)  # port 9: nothing listens
    with pytest.raises(RemoteRewardError, match="ClientConnectorError"):
        asyncio.run(unreachable(samples_for(1)[0]))
