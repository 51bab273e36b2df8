"""One stage of a sync (join, broadcast, apply): calls to every engine, and maybe the trainer's own part of a
collective, awaited together under the push's deadline.

A failure names the stage and each engine that refused or did not answer; a timeout also names the flag that
sets it. When calls are still pending at the deadline, every pending engine is asked for /health (for at most
``DIAGNOSE_TIMEOUT_S`` more): one that answers is alive and was waiting inside the collective for the others;
one that does not is hung or gone, and is the engine the error names first.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable

import httpx

from sluice.sync.engine_calls import EngineCallFailed, call_engine
from sluice.sync.interface import Deadline, WeightSyncError

TIMEOUT_FLAG = "--update-weights-timeout"
DIAGNOSE_TIMEOUT_S = 0.5


async def run_stage(stage: str, version: int | None, http: httpx.AsyncClient, engine_calls: dict[str, Awaitable],
                    deadline: Deadline, trainer_part: asyncio.Future | None = None,
                    stage_after_trainer: str | None = None, refusal_stage: str | None = None) -> dict:
    """Await every engine call (by URL; names that are no URL are in-process engines) and ``trainer_part``;
    returns each engine's answer, or raises ``WeightSyncError``.

    ``stage_after_trainer``: the stage to report for engines still busy once the trainer's part is done (the
    last bucket's broadcast arrived; the engine is applying it); ``refusal_stage``: the stage to report when
    every problem is an engine's refusal (it received the weights and would not apply them)."""
    tasks = {url: asyncio.ensure_future(call) for url, call in engine_calls.items()}
    waiting = list(tasks.values()) + ([trainer_part] if trainer_part is not None else [])
    await asyncio.wait(waiting, timeout=deadline.remaining())
    failed = {url: task.exception() for url, task in tasks.items() if task.done() and task.exception() is not None}
    pending = [url for url, task in tasks.items() if not task.done()
               or isinstance(failed.get(url), httpx.TimeoutException)]  # its HTTP timeout hit the deadline
    failed = {url: error for url, error in failed.items() if url not in pending}
    for task in tasks.values():
        task.cancel()
    alive = await _answering_health(http, pending)
    hung = [url for url in pending if url not in alive]
    problems = [_describe_silent(url, deadline.seconds) for url in hung]
    problems += [f"engine {url} did not answer within {deadline.seconds:g} s (it answers /health: it was "
                 "waiting for the other ranks)" for url in pending if url in alive]
    problems += [_describe(url, error) for url, error in failed.items()]
    timed_out = bool(pending)
    trainer_done = trainer_part is None or trainer_part.done()
    if not trainer_done:
        timed_out = True
        problems.append(f"the trainer (rank 0) was still waiting for the other ranks after {deadline.seconds:g} s")
    elif trainer_part is not None and trainer_part.exception() is not None:
        problems.append(f"the trainer (rank 0) failed: {trainer_part.exception()}")
        # the group's own timeout (gloo, TCPStore) is the same flag
        timed_out = timed_out or "timed out" in str(trainer_part.exception()).lower()
    if not problems:
        return {url: task.result() for url, task in tasks.items()}
    trainer_ok = trainer_done and (trainer_part is None or trainer_part.exception() is None)
    if trainer_ok and refusal_stage and not pending and all(isinstance(e, EngineCallFailed) for e in failed.values()):
        stage = refusal_stage
    elif trainer_ok and stage_after_trainer:
        stage = stage_after_trainer
    what = f"weight sync to version {version}" if version is not None else "weight sync setup"
    hint = f" ({TIMEOUT_FLAG} is {deadline.seconds:g} s; raise it if the engines are only slow)" if timed_out else ""
    blamed = hung + list(failed) + [url for url in pending if url not in hung]
    raise WeightSyncError(f"{what} failed at stage {stage!r}: {'; '.join(problems)}{hint}",
                          engine=blamed[0] if blamed else None, stage=stage, unresponsive=hung)


async def _answering_health(http: httpx.AsyncClient, urls: list[str]) -> set[str]:
    """Those of ``urls`` (engine servers) that answer /health within DIAGNOSE_TIMEOUT_S."""
    servers = [url for url in urls if url.startswith(("http://", "https://"))]
    answers = await asyncio.gather(*(call_engine(http, url, "/health", None, DIAGNOSE_TIMEOUT_S) for url in servers),
                                   return_exceptions=True)
    return {url for url, answer in zip(servers, answers) if not isinstance(answer, BaseException)}


def _describe_silent(url: str, seconds: float) -> str:
    if url.startswith(("http://", "https://")):
        return f"engine {url} did not answer within {seconds:g} s, nor /health: it is hung or gone"
    return f"{url} did not finish within {seconds:g} s"


def _describe(url: str, error: BaseException) -> str:
    if isinstance(error, EngineCallFailed):
        return f"engine {url} refused: {error.message}"
    return f"engine {url}: {type(error).__name__}: {error}"
