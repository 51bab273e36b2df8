"""The one interface for pushing the trainer's weights to engines, its report, and its error."""

from __future__ import annotations

import abc
import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

NamedWeights = Mapping[str, torch.Tensor]  # HF names -> tensors, as the trainer's named_weights() gives them


@dataclass
class EngineResult:
    """What one engine said about one push."""

    engine: str  # its URL, or "in-process engine #i"
    success: bool
    message: str


@dataclass
class SyncReport:
    """One push of one weight version to every engine."""

    method: str  # in_process | broadcast | disk
    version: int
    seconds: float  # wall time of the whole push, checks included
    num_bytes: int  # bytes of the distinct tensors pushed (aliases such as a tied lm_head counted once)
    num_buckets: int  # collectives (broadcast), files written (disk: 1), engine calls (in-process: 1)
    engines: list[EngineResult] = field(default_factory=list)


class WeightSyncError(RuntimeError):
    """A push that did not complete: names the engine, the stage (join, broadcast, apply, write) and why."""

    def __init__(self, message: str, engine: str | None = None, stage: str | None = None,
                 unresponsive: list[str] | None = None):
        super().__init__(message)
        self.engine = engine  # the engine to look at first (hung, else refused), None when only the trainer failed
        self.stage = stage
        self.unresponsive = unresponsive or []  # engines that answered nothing, not even /health


class WeightSync(abc.ABC):
    """Pushes the trainer's weights to every engine, tagged with a version; used from the trainer's process.

    ``connect`` sets up what lasts across pushes (process groups); ``push`` sends one version and returns once
    every engine has applied it, or raises ``WeightSyncError``; ``close`` tears down what ``connect`` built.
    """

    method: str

    async def connect(self) -> None:
        """Set up once; ``push`` calls it when needed (again after a failed push broke the group)."""

    @abc.abstractmethod
    async def push(self, named_weights: NamedWeights, version: int) -> SyncReport: ...

    async def close(self) -> None:
        """Release groups and files; the engines keep the weights they have."""


def distinct_weights(named_weights: NamedWeights) -> dict[str, torch.Tensor]:
    """The weights without aliases: a tensor that views exactly the memory of an earlier one (a tied lm_head in
    a state_dict) is dropped, as the engine maps both names onto one parameter."""
    seen: set[tuple] = set()
    distinct = {}
    for name, tensor in named_weights.items():
        key = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        distinct[name] = tensor.detach()
    return distinct


def num_bytes(weights: NamedWeights) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


class Deadline:
    """The time left of one push or connect, for every wait inside it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())


def in_daemon_thread(function: Callable, *args) -> asyncio.Future:
    """Run a blocking call (a collective, a rendezvous) in a daemon thread; await its result.

    Not ``asyncio.to_thread``: a collective stuck past our deadline must not hold up the event loop's shutdown,
    which waits for the default executor's threads.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome, failed: bool) -> None:
        if not future.done():
            future.set_exception(outcome) if failed else future.set_result(outcome)

    def run() -> None:
        try:
            outcome, failed = function(*args), False
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting side
            outcome, failed = error, True
        try:
            loop.call_soon_threadsafe(settle, outcome, failed)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    # Read a late failure (after the caller gave up waiting), so asyncio does not log it as never retrieved.
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    threading.Thread(target=run, name=f"sluice-sync-{getattr(function, '__name__', 'call')}", daemon=True).start()
    return future
