"""The agent gateway with the real ``openai`` client: chat completions through it are recorded token for token
(prompt ids, output ids, logprobs), continued conversations are one trajectory whose trainer logprobs equal the
engine's, rewritten histories fan out, tool calls come back as OpenAI tool_calls, agents train through the manager."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.demo.tokenizer import save_tokenizer
from sluice.engine.clients.in_process import InProcessClient
from sluice.rollout.agent import AgentTask, load_agent_generate
from sluice.rollout.gateway import AgentGateway
from sluice.rollout.generate import GenerateContext
from sluice.rollout.manager import RolloutManager
from sluice.rollout.seeds import turn_seed
from sluice.rollout.sessions import segment_sample, segments
from sluice.trainer.batching import collate
from sluice.trainer.torch_backend import TorchTrainer
from sluice.engine.clients.protocol import GenerateRequest, GenerateResult
from sluice.types import Sample, SamplingParams, Status
from helpers.scripted_client import ScriptedClient, call

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=64)


@pytest.fixture(scope="module")
def gateway(engine):
    gateway = AgentGateway(InProcessClient(engine), engine.tokenizer, engine.context_len).start()
    yield gateway
    gateway.stop()


def chat(client: openai.OpenAI, messages: list[dict], **kw):
    return client.chat.completions.create(model="policy", messages=messages, **kw)


def test_a_continued_conversation_is_one_exact_trajectory(gateway, engine, lively_checkpoint):
    session = gateway.open_session(PARAMS, budget=64)
    client = openai.OpenAI(base_url=gateway.base_url(session), api_key="anything")
    messages = [{"role": "user", "content": "hello"}]
    first = chat(client, messages, max_tokens=6, logprobs=True, temperature=0.1)  # the run's temperature applies
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "more"}]
    second = chat(client, messages, max_tokens=6, logprobs=True)
    turns = gateway.close_session(session)

    assert [t.continues for t in turns] == [False, True]
    for turn, response in zip(turns, (first, second)):
        assert response.model_extra["prompt_token_ids"] == turn.prompt_ids
        assert response.choices[0].model_extra["token_ids"] == turn.output_ids
        assert [c.logprob for c in response.choices[0].logprobs.content] == turn.result.output_logprobs
        assert response.usage.completion_tokens == len(turn.output_ids) <= 6
    # the second prompt is the first prompt, the first output, then the template's continuation
    assert turns[1].prompt_ids[: len(turns[0].prompt_ids) + len(turns[0].output_ids)] == \
        turns[0].prompt_ids + turns[0].output_ids
    sample = segment_sample(Sample(prompt="hello"), segments(turns)[0])
    appended = len(turns[1].prompt_ids) - len(turns[0].prompt_ids) - len(turns[0].output_ids)
    assert sample.loss_mask == [1] * len(turns[0].output_ids) + [0] * appended + [1] * len(turns[1].output_ids)
    assert sample.tokens == turns[1].prompt_ids + turns[1].output_ids

    trainer = TorchTrainer(lively_checkpoint, TrainConfig(train_device="cpu"), AlgorithmConfig(), temperature=1.0)
    batch = collate([sample], [0.0], pad_id=0)
    trained = batch.loss_mask.bool()
    torch_close = trainer.compute_logprobs(batch)[trained] - batch.rollout_log_probs[trained]
    assert torch_close.abs().max().item() < 1e-4  # exactly the sampled tokens, under the run's temperature


def test_closed_sessions_streams_budgets_and_the_native_endpoint(gateway, engine):
    session = gateway.open_session(PARAMS, budget=4)
    client = openai.OpenAI(base_url=gateway.base_url(session), api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="does not stream"):
        chat(client, [{"role": "user", "content": "hi"}], stream=True)
    reply = chat(client, [{"role": "user", "content": "hi"}], max_tokens=50)
    assert reply.usage.completion_tokens <= 4  # the session's budget caps the agent's max_tokens
    assert [m.id for m in client.models.list().data] == ["sluice-policy"]
    gateway.close_session(session)
    with pytest.raises(openai.NotFoundError, match="no open session"):
        chat(client, [{"role": "user", "content": "hi"}])

    ids = engine.tokenizer.encode("abc", add_special_tokens=False)
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 3, "temperature": 1.0}, "return_logprob": True}
    out = httpx.post(gateway.url + "/generate", json=body, timeout=30).json()
    assert len(out["output_ids"]) == len(out["meta_info"]["output_token_logprobs"]) <= 3
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")


class HeldClient:
    """Passes requests on to ``client`` once ``together`` of them have arrived (so they are all in flight at once),
    noting each request's seed (in arrival order) and the tokens it drew."""

    def __init__(self, client, together: int):
        self.client, self.together, self.seeds = client, together, []
        self.drawn: dict[int, list[int]] = {}  # seed -> output_ids
        self.arrived: asyncio.Event | None = None

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.arrived = self.arrived or asyncio.Event()
        self.seeds.append(request.sampling_params.seed)
        if len(self.seeds) >= self.together:
            self.arrived.set()
        await self.arrived.wait()
        result = await self.client.generate(request)
        self.drawn[request.sampling_params.seed] = result.output_ids
        return result


def test_completions_in_flight_together_get_their_own_seeds_and_a_sequential_replay_repeats_them(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=1234)
    messages = [{"role": "user", "content": "tell me"}]

    async def best_of_two(gateway: AgentGateway) -> list[str]:
        session = gateway.open_session(params, budget=64)
        client = openai.AsyncOpenAI(base_url=gateway.base_url(session), api_key="x", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.create(model="policy", messages=messages)
                                         for _ in range(2)))
        gateway.close_session(session)
        return [reply.choices[0].model_extra["token_ids"] for reply in replies]

    together = HeldClient(InProcessClient(engine), together=2)
    gateway = AgentGateway(together, engine.tokenizer, engine.context_len).start()
    try:
        outputs = asyncio.run(best_of_two(gateway))
    finally:
        gateway.stop()
    expected_seeds = [turn_seed(1234, 0), turn_seed(1234, 1)]
    assert sorted(together.seeds) == sorted(expected_seeds) and expected_seeds[0] != expected_seeds[1]
    assert outputs[0] != outputs[1]  # best-of-two: two draws, not one twice

    # one after the other, in a new session: the same seeds in order, and so the same two outputs
    one_by_one = HeldClient(InProcessClient(engine), together=1)
    gateway = AgentGateway(one_by_one, engine.tokenizer, engine.context_len).start()
    try:
        session = gateway.open_session(params, budget=64)
        client = openai.OpenAI(base_url=gateway.base_url(session), api_key="x", max_retries=0)
        replayed = [chat(client, messages).choices[0].model_extra["token_ids"] for _ in range(2)]
        gateway.close_session(session)
    finally:
        gateway.stop()
    assert one_by_one.seeds == expected_seeds
    # the requests in flight together may reach the engine in either order: match the draws by seed
    assert one_by_one.drawn == together.drawn
    assert sorted(replayed) == sorted(outputs)


def rewriting_agent(task: AgentTask) -> float:
    """Asks, then starts over with a summary instead of the history: two segments."""
    client = openai.OpenAI(base_url=task.base_url, api_key=task.api_key)
    first = chat(client, [{"role": "user", "content": task.prompt}], max_tokens=4)
    chat(client, [{"role": "user", "content": f"you said {first.choices[0].message.content!r}"}], max_tokens=4)
    return 0.25


def test_agents_train_through_the_manager_and_rewritten_histories_fan_out(gateway, engine, tmp_path, monkeypatch):
    (tmp_path / "gateway_agents.py").write_text(
        "from test_gateway import rewriting_agent\nfrom examples.plugins.agent import answer_then_check\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = GenerateContext(InProcessClient(engine), engine.tokenizer)
    tokens = engine.tokenizer.encode("7", add_special_tokens=False)
    prompts = [Sample(prompt="say 7", prompt_tokens=tokens, label="7")]

    checking = RolloutManager(ctx, None, generate_fn=load_agent_generate("gateway_agents.answer_then_check", gateway))
    groups = asyncio.run(checking.generate_groups(prompts, 2, SamplingParams(max_new_tokens=80)))
    for sample in groups[0].samples:  # one continued conversation per sample, rewarded by the agent itself
        assert sample.reward in (0.0, 1.0) and sample.status in (Status.COMPLETED, Status.TRUNCATED)
        assert 0 in sample.loss_mask and sample.loss_mask[0] == 1 and len(sample.weight_versions) == 2

    rewriting = RolloutManager(ctx, None, generate_fn=load_agent_generate("gateway_agents.rewriting_agent", gateway))
    groups = asyncio.run(rewriting.generate_groups(prompts, 2, SamplingParams(max_new_tokens=20)))
    assert len(groups[0].samples) == 4  # two segments per sample
    assert [s.metadata["segment"] for s in groups[0].samples] == [0, 1, 0, 1]
    assert all(s.reward == 0.25 and s.loss_mask == [1] * s.response_length for s in groups[0].samples)


def test_tool_calls_round_trip_as_openai_tool_calls_and_continue_token_wise(tmp_path):
    save_tokenizer(tmp_path, with_tools=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    scripted = ScriptedClient(tokenizer, ["let me compute " + call("34+58"), "92"])
    gateway = AgentGateway(scripted, tokenizer, context_len=1024).start()
    try:
        session = gateway.open_session(PARAMS, budget=400)
        client = openai.OpenAI(base_url=gateway.base_url(session), api_key="x")
        tools = [{"type": "function", "function": {"name": "calculator", "description": "arithmetic",
                                                    "parameters": {"type": "object", "properties": {
                                                        "expression": {"type": "string"}}}}}]
        messages = [{"role": "user", "content": "34+58="}]
        first = chat(client, messages, tools=tools)
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls" and message.content == "let me compute"
        assert message.tool_calls[0].function.name == "calculator"
        assert json.loads(message.tool_calls[0].function.arguments) == {"expression": "34+58"}
        messages += [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "92"}]
        second = chat(client, messages, tools=tools)
        assert second.choices[0].message.content == "92"
        turns = gateway.close_session(session)
    finally:
        gateway.stop()
    assert [t.continues for t in turns] == [False, True]
    sample = segment_sample(Sample(prompt="34+58="), turns)
    conversation = [{"role": "user", "content": "34+58="},
                    {"role": "assistant", "content": "let me compute " + call("34+58")},
                    {"role": "tool", "content": "92"}, {"role": "assistant", "content": "92"}]
    rendered = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    assert rendered["input_ids"][: len(sample.tokens)] == sample.tokens
    assert sample.loss_mask == rendered["assistant_masks"][len(sample.prompt_tokens): len(sample.tokens)]
