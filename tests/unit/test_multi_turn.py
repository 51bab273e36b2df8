"""Multi-turn tool use, token-in/token-out: the trained tokens and loss masks of a conversation equal what the chat
template (a Qwen-like one with tools) renders for the same conversation, with its assistant mask; tool output is
never trained; the token budget, the turn cap and tool errors; fan-out through the manager.

The tool-calling turns come from a scripted engine client (a tiny random model does not write tool calls); the
no-tool path and fan-out run on the real engine.
"""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from sluice.demo.tokenizer import save_tokenizer
from sluice.engine.clients.in_process import InProcessClient
from sluice.rollout.chat_turns import TemplateError, continuation_text
from sluice.rollout.generate import GenerateContext
from sluice.rollout.finish import scalar_rewards
from sluice.rollout.manager import RolloutManager
from sluice.rollout.metrics import rollout_metrics
from sluice.rollout.multi_turn import generate_with_tools
from sluice.rollout.seeds import turn_seed
from sluice.rollout.tools import load_tools
from sluice.types import Sample, SamplingParams, Status

from helpers.scripted_client import ScriptedClient, call

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")
CALCULATOR = "examples/calculator_agent/tools.py:calculator"


@pytest.fixture(scope="module")
def tool_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tool_tokenizer")
    save_tokenizer(path, with_tools=True)
    return AutoTokenizer.from_pretrained(path)


def run_conversation(tokenizer, texts: list[str], user: str = "34+58=", max_new_tokens: int = 400,
                     max_turns: int = 4, seed: int | None = None):
    tools = load_tools([CALCULATOR])
    kwargs = {"tools": tools.schemas()}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True, **kwargs)
    sample = Sample(prompt=user, prompt_tokens=tokenizer.encode(prompt, add_special_tokens=False), index=5)
    client = ScriptedClient(tokenizer, texts)
    ctx = GenerateContext(client, tokenizer, tools=tools, max_turns=max_turns, chat_template_kwargs=kwargs)
    out = asyncio.run(generate_with_tools(sample, SamplingParams(max_new_tokens=max_new_tokens, seed=seed), ctx))
    return out, client, kwargs


def rendered(tokenizer, conversation: list[dict], kwargs: dict) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, **kwargs)
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_tokens_and_loss_mask_equal_the_chat_template_of_the_conversation(tool_tokenizer):
    turns = [call("34+58"), "checking " + call("92-58") + call("2*46"), "92"]
    out, client, kwargs = run_conversation(tool_tokenizer, turns)
    assert out.status == Status.COMPLETED and out.response == "92"
    conversation = [{"role": "user", "content": "34+58="},
                    {"role": "assistant", "content": turns[0]}, {"role": "tool", "content": "92"},
                    {"role": "assistant", "content": turns[1]}, {"role": "tool", "content": "34"},
                    {"role": "tool", "content": "92"}, {"role": "assistant", "content": turns[2]}]
    ids, assistant = rendered(tool_tokenizer, conversation, kwargs)
    # the template adds a newline after the final <|im_end|>; everything before it is the sample, token for token
    assert ids[: len(out.tokens)] == out.tokens and tool_tokenizer.decode(ids[len(out.tokens):]) == "\n"
    assert out.loss_mask == assistant[len(out.prompt_tokens): len(out.tokens)]
    assert out.response_length == len(out.tokens) - len(out.prompt_tokens) == len(out.rollout_log_probs)
    # trained tokens carry the engine's logprobs, appended ones 0; each turn's request is the conversation so far
    trained = [lp for lp, m in zip(out.rollout_log_probs, out.loss_mask) if m]
    assert trained == [-0.01 * (k + 1) for t in turns
                       for k in range(len(tool_tokenizer.encode(t, add_special_tokens=False)) + 1)]
    assert all(lp == 0.0 for lp, m in zip(out.rollout_log_probs, out.loss_mask) if not m)
    assert [len(r.input_ids) for r in client.requests] == sorted(len(r.input_ids) for r in client.requests)
    assert client.requests[-1].input_ids == out.tokens[: len(client.requests[-1].input_ids)]
    assert out.weight_versions == [7, 7, 7]
    assert out.metadata["metrics"] == {"tool_calls": 3.0, "used_tool": 1.0, "tool_errors": 0.0, "turns": 3.0}


def test_each_turn_draws_with_its_own_seed(tool_tokenizer):
    """Turn 0 keeps the sample's seed (as a single-turn call would), later turns derive theirs (rollout/seeds.py)."""
    _, client, _ = run_conversation(tool_tokenizer, [call("34+58"), call("92-58"), "92"], seed=99)
    seeds = [r.sampling_params.seed for r in client.requests]
    assert seeds == [99, turn_seed(99, 1), turn_seed(99, 2)] and len(set(seeds)) == 3
    _, unseeded, _ = run_conversation(tool_tokenizer, [call("34+58"), "92"])
    assert [r.sampling_params.seed for r in unseeded.requests] == [None, None]


def test_tool_errors_are_the_models_observation(tool_tokenizer):
    turns = [call("1/0") + call("2+2", name="search") + "<tool_call>{oops}</tool_call>", "4"]
    out, _, kwargs = run_conversation(tool_tokenizer, turns)
    answers = [m["content"] for m in out.metadata["messages"] if m["role"] == "tool"]
    assert answers == ["error: ZeroDivisionError: division by zero",
                       "error: unknown tool 'search'; available: calculator",
                       "error: malformed tool call: not valid JSON: Expecting property name enclosed in double "
                       "quotes at char 1"]
    assert out.metadata["metrics"]["tool_errors"] == 3.0
    conversation = [{"role": "user", "content": "34+58="}, {"role": "assistant", "content": turns[0]},
                    *({"role": "tool", "content": a} for a in answers), {"role": "assistant", "content": "4"}]
    ids, assistant = rendered(tool_tokenizer, conversation, kwargs)
    assert ids[: len(out.tokens)] == out.tokens
    assert out.loss_mask == assistant[len(out.prompt_tokens): len(out.tokens)]


def test_the_turn_cap_and_the_token_budget(tool_tokenizer):
    out, client, _ = run_conversation(tool_tokenizer, [call("1+1"), call("2+2")], max_turns=2)
    assert len(client.requests) == 2 and out.status == Status.COMPLETED  # the last turn's call is not answered
    assert out.metadata["metrics"]["tool_calls"] == 1.0 and out.response.startswith("<tool_call>")

    first_turn = len(tool_tokenizer.encode(call("1+1"), add_special_tokens=False)) + 1
    out, client, _ = run_conversation(tool_tokenizer, [call("1+1"), "2"], max_new_tokens=first_turn + 5)
    assert out.status == Status.TRUNCATED and len(client.requests) == 1  # the tool result would not fit
    assert out.response_length == first_turn <= first_turn + 5

    out, client, _ = run_conversation(tool_tokenizer, [call("1+1"), "2" * 40], max_new_tokens=first_turn + 30)
    assert out.status == Status.TRUNCATED and out.response_length == first_turn + 30  # the budget counts all tokens
    assert client.requests[1].sampling_params.max_new_tokens == first_turn + 30 - (
        len(client.requests[1].input_ids) - len(out.prompt_tokens))


def test_continuation_does_not_repeat_the_generated_stop_token(tool_tokenizer):
    tool = [{"role": "tool", "content": "92"}]
    after_eos = continuation_text(tool_tokenizer, "<|im_end|>", tool)
    assert after_eos == "\n<|im_start|>user\n<tool_response>\n92\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert continuation_text(tool_tokenizer, "", tool) == "<|im_end|>" + after_eos  # turn ended on a stop string

    class Rewriting:  # a template that renders the last assistant turn differently from earlier ones
        def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kwargs):
            last = len(messages) - 1
            return "".join(f"[{m['role']}{'*' if i == last else ''}]{m['content']}" for i, m in enumerate(messages))

    with pytest.raises(TemplateError, match="cannot be continued token for token"):
        continuation_text(Rewriting(), "", tool)


def test_no_tool_call_is_one_turn_on_the_real_engine_and_fan_out_trains_every_sample(engine):
    from examples.plugins.rollout import two_answers

    tokenizer = engine.tokenizer
    tools = load_tools([CALCULATOR])
    ctx = GenerateContext(InProcessClient(engine), tokenizer, tools=tools, max_turns=3)
    prompt = [Sample(prompt="hi", prompt_tokens=tokenizer.encode("hi", add_special_tokens=False))]

    async def one(sample: Sample) -> float:
        return 1.0

    manager = RolloutManager(ctx, one, generate_fn=generate_with_tools)
    groups = asyncio.run(manager.generate_groups(prompt, 3, SamplingParams(max_new_tokens=6)))
    for sample in groups[0].samples:  # a random tiny model writes no tool call: one turn, all trained
        assert sample.metadata["metrics"]["turns"] == 1.0 and sample.loss_mask == [1] * sample.response_length
        assert sample.tokens == sample.prompt_tokens + sample.response_tokens
    assert rollout_metrics(groups, scalar_rewards(groups, manager))["rollout/used_tool"] == 0.0

    fan_out = RolloutManager(ctx, one, generate_fn=two_answers)
    groups = asyncio.run(fan_out.generate_groups(prompt * 2, 2, SamplingParams(max_new_tokens=4)))
    assert [len(g.samples) for g in groups] == [4, 4]
    assert all(s.group_index == i and s.reward == 1.0 for i, g in enumerate(groups) for s in g.samples)
