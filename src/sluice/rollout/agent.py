"""``--agent-function-path``: an agent program, written against the ``openai`` client, as a generate function.

For each sample the agent gets a session of the gateway (gateway.py) as its OpenAI base URL and runs as it
would against any OpenAI-compatible server::

    def solve(task: AgentTask) -> float | None:
        client = openai.OpenAI(base_url=task.base_url, api_key=task.api_key)
        reply = client.chat.completions.create(model=task.model, messages=[{"role": "user", "content": task.prompt}])
        return 1.0 if reply.choices[0].message.content.strip() == task.label else 0.0

Its chat completions become the sample's tokens (one sample per history segment, sessions.py). What it returns
is the reward of every sample of the trajectory; None leaves scoring to the reward function, which sees the
final reply as ``sample.response``. A sync agent runs in a daemon thread; cancelling the rollout closes the
session, so the agent's next request fails and it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sluice.plugins import Contract, load_plugin
from sluice.rewards.contract import as_reward_value
from sluice.rollout.gateway import AgentGateway
from sluice.rollout.generate import STATUS_OF_FINISH, GenerateContext
from sluice.rollout.sessions import segment_sample, segments
from sluice.types import Sample, SamplingParams

FLAG = "--agent-function-path"
CONTRACT = Contract(FLAG, "[async] fn(task: AgentTask) -> float | dict | None", 1)


@dataclass
class AgentTask:
    """What an agent program gets for one sample."""

    base_url: str  # the session's OpenAI base URL: openai.OpenAI(base_url=task.base_url, api_key=task.api_key)
    api_key: str  # the gateway's key for this run: send it (the openai client does) and share it with no one
    model: str  # any name works; this is the one /models lists
    prompt: str | list[dict[str, Any]]  # the sample's prompt: text, or chat messages
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    sample_index: int = 0


def load_agent_generate(path: str, gateway: AgentGateway):
    """A generate function running the agent at ``path`` through ``gateway``; errors name the flag."""
    plugin = load_plugin(path, CONTRACT)

    async def generate_with_agent(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext):
        session = gateway.open_session(sampling_params, sampling_params.max_new_tokens)
        task = AgentTask(gateway.base_url(session), gateway.agent_api_key, gateway.model_name, sample.prompt,
                         sample.label, dict(sample.metadata), sample.index)
        try:
            reward = await plugin.call(None, task)
        finally:
            turns = gateway.close_session(session)
        if not turns:
            raise ValueError(f"{path}: the agent made no chat completion request through task.base_url")
        samples = []
        for k, segment in enumerate(segments(turns)):
            out = segment_sample(sample, segment)
            out.status = STATUS_OF_FINISH[segment[-1].result.finish_reason]
            out.metadata["segment"] = k
            if reward is not None:
                out.reward = as_reward_value(reward, path)
            samples.append(out)
        return samples if len(samples) > 1 else samples[0]

    generate_with_agent.__name__ = generate_with_agent.__qualname__ = plugin.name
    return generate_with_agent
