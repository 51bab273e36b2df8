"""Agent sessions of the gateway: each chat completion recorded token for token, and trajectories -> samples.

A session is one agent run for one sample. Every completion is a ``Turn``: the prompt ids the engine saw, the
ids it generated and their logprobs. When a request repeats the previous request's messages plus the reply the
gateway gave (the usual agent loop: append the reply and the tool results, ask again), its prompt is built as
previous prompt + previous output + the template's continuation of the new messages (chat_turns.py), so the
trajectory is exactly the sampled tokens. A request that rewrites history starts a new segment; each segment
becomes one training sample (fan-out), all in the group of the prompt.

Threads: the gateway's event loop thread records turns, the rollout's thread opens and closes sessions; one lock
guards the session table, each session's turn list and its request count.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from sluice.engine.clients.protocol import GenerateResult
from sluice.types import Sample, SamplingParams


@dataclass
class Turn:
    messages: list[dict[str, Any]]  # the request's messages (normalised, see ``message_key``)
    prompt_ids: list[int]
    result: GenerateResult
    reply: dict[str, Any]  # the assistant message the gateway answered with
    continues: bool  # True: prompt_ids = previous turn's prompt + output + appended continuation

    @property
    def output_ids(self) -> list[int]:
        return self.result.output_ids


@dataclass
class Session:
    id: str
    sampling_params: SamplingParams  # the run's sampling settings: the agent's own are not used
    budget: int  # response tokens of a segment, generated and appended (--rollout-max-response-len)
    turns: list[Turn] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)  # engine request ids, aborted when the session closes
    # Engine requests started, finished or not: numbers each request (its seed) even while several are in flight,
    # where len(turns) grows only as they finish.
    num_requests: int = 0
    closed: bool = False


class SessionTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def open(self, sampling_params: SamplingParams, budget: int) -> Session:
        session = Session(uuid.uuid4().hex, sampling_params, budget)
        with self._lock:
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(session_id)
        return None if session is None or session.closed else session

    def track(self, session: Session, rid: str) -> int | None:
        """Note an engine request of ``session`` (aborted if the session closes) and return its number in the
        session (from 0); None if the session already closed."""
        with self._lock:
            if session.closed:
                return None
            session.in_flight.add(rid)
            session.num_requests += 1
            return session.num_requests - 1

    def untrack(self, session: Session, rid: str) -> None:
        with self._lock:
            session.in_flight.discard(rid)

    def record(self, session: Session, turn: Turn) -> None:
        with self._lock:
            if not session.closed:
                session.turns.append(turn)

    def close(self, session: Session) -> tuple[list[Turn], list[str]]:
        """Forget the session; returns its turns and the engine requests still in flight (to abort)."""
        with self._lock:
            session.closed = True
            self._sessions.pop(session.id, None)
            return list(session.turns), list(session.in_flight)


def message_key(message: dict[str, Any]) -> tuple:
    """What identifies a message for "the agent repeated the conversation": role, text, name, tool call ids."""
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    calls = tuple(call.get("id") for call in message.get("tool_calls") or [])
    return message.get("role"), (content or "").strip(), message.get("name"), message.get("tool_call_id"), calls


def is_reply(message: dict[str, Any], reply: dict[str, Any]) -> bool:
    """Whether ``message`` is the assistant reply ``reply`` sent back by the agent (possibly re-serialised)."""
    if message.get("role") != "assistant":
        return False
    ours = {call["id"] for call in reply.get("tool_calls") or []}
    theirs = {call.get("id") for call in message.get("tool_calls") or []}
    if ours:
        return ours == theirs
    return message_key(message)[1] == (reply.get("content") or "").strip()


def continued_turn(turns: list[Turn], messages: list[dict[str, Any]]) -> tuple[Turn, list[dict[str, Any]]] | None:
    """(the previous turn, the messages after its reply) when ``messages`` extends it, else None."""
    if not turns:
        return None
    last = turns[-1]
    n = len(last.messages)
    if len(messages) <= n or [message_key(m) for m in messages[:n]] != [message_key(m) for m in last.messages]:
        return None
    if not is_reply(messages[n], last.reply):
        return None
    return last, messages[n + 1:]


def current_segment(turns: list[Turn]) -> list[Turn]:
    start = max((i for i, t in enumerate(turns) if not t.continues), default=0)
    return turns[start:]


def segments(turns: list[Turn]) -> list[list[Turn]]:
    out: list[list[Turn]] = []
    for turn in turns:
        if not turn.continues or not out:
            out.append([])
        out[-1].append(turn)
    return out


def segment_sample(template: Sample, segment: list[Turn]) -> Sample:
    """One training sample from a segment: generated ids trained (mask 1), appended ids not (mask 0)."""
    first = segment[0]
    tokens = list(first.prompt_ids)
    mask: list[int] = []
    logprobs: list[float] = []
    sample = Sample(prompt=template.prompt, group_index=template.group_index, index=template.index,
                    prompt_tokens=list(first.prompt_ids), label=template.label, metadata=dict(template.metadata))
    for turn in segment:
        appended = turn.prompt_ids[len(tokens):]  # the continuation between the previous turn and this one
        tokens += appended + turn.output_ids
        mask += [0] * len(appended) + [1] * len(turn.output_ids)
        logprobs += [0.0] * len(appended) + list(turn.result.output_logprobs)
        sample.weight_versions.append(turn.result.weight_version)
    sample.tokens, sample.loss_mask, sample.rollout_log_probs = tokens, mask, logprobs
    sample.response_length = len(mask)
    sample.response = segment[-1].reply.get("content") or ""
    return sample
