"""--agent-function-path: an agent written against the openai client, trained through sluice's gateway."""

from __future__ import annotations

import openai

from sluice.rollout import AgentTask


def answer_then_check(task: AgentTask) -> float:
    """Ask once, then ask the model to repeat its answer; the reward is 1 if the final answer is right."""
    client = openai.OpenAI(base_url=task.base_url, api_key=task.api_key)
    messages = [{"role": "user", "content": task.prompt}]
    first = client.chat.completions.create(model=task.model, messages=messages, max_tokens=8)
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "user", "content": "final answer?"}]
    final = client.chat.completions.create(model=task.model, messages=messages, max_tokens=8)
    return 1.0 if (final.choices[0].message.content or "").strip() == str(task.label) else 0.0
