"""The timed loop of a training benchmark: warm-up steps, then timed steps, each phase on a synchronised clock.

The same loop times our trainer and the plain Hugging Face loop, so both figures measure the same thing. The
time inside ``optimizer.step()`` is read through the optimizer's public step hooks, which leave the code that
calls the optimizer untouched. On CUDA the hooks record events rather than synchronising, so the step runs as it
would unobserved; the events are read after the step's closing synchronisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sluice.bench.run_info import peak_memory_gib, reset_peak_memory, synced_clock


@dataclass
class TrainTimes:
    """Seconds of each timed step, per phase (warm-up steps excluded)."""

    train_step_s: list[float] = field(default_factory=list)  # forward + backward + optimizer, whole batch
    optimizer_s: list[float] = field(default_factory=list)  # inside optimizer.step() (part of train_step_s)
    old_logprobs_s: list[float] = field(default_factory=list)  # the no-grad pass before the step, if run
    peak_memory_gib: float | None = None  # since the model loaded, warm-up included (CUDA only)


class PhaseOutOfMemory(RuntimeError):
    """The device ran out of memory in one phase of the timed loop; the message names the phase and step."""

    def __init__(self, phase: str, step: int, num_warmup: int, peak_gib: float | None, error: Exception):
        which = f"warm-up step {step + 1}" if step < num_warmup else f"timed step {step - num_warmup + 1}"
        peak = f", peak {peak_gib:.2f} GiB allocated" if peak_gib is not None else ""
        super().__init__(f"out of memory in the {phase} ({which}{peak}): {str(error).splitlines()[0]}")


class OptimizerTimer:
    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[list] = []  # [start, end]: CUDA events, or perf_counter values on CPU
        self.handles = [optimizer.register_step_pre_hook(lambda *_: self._mark(start=True)),
                        optimizer.register_step_post_hook(lambda *_: self._mark(start=False))]

    def _mark(self, start: bool) -> None:
        if self.cuda:
            now = torch.cuda.Event(enable_timing=True)
            now.record()
        else:
            now = time.perf_counter()
        if start:
            self.marks.append([now, None])
        else:
            self.marks[-1][1] = now

    def take(self) -> float:
        """Seconds inside ``step()`` since the last call (0 if the step was skipped, e.g. a non-finite norm)."""
        if self.cuda:
            seconds = sum(start.elapsed_time(end) / 1e3 for start, end in self.marks)
        else:
            seconds = sum(end - start for start, end in self.marks)
        self.marks.clear()
        return seconds

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def time_steps(device: torch.device, num_warmup: int, num_steps: int, train_step: Callable[[], object],
               optimizer: torch.optim.Optimizer | None, old_logprobs: Callable[[], object] | None = None) -> TrainTimes:
    """Run ``num_warmup`` then ``num_steps`` steps of ``old_logprobs()`` (if given) then ``train_step()``.

    Running out of device memory raises ``PhaseOutOfMemory``, which says in which phase and step."""
    times = TrainTimes()
    reset_peak_memory(device)
    timer = OptimizerTimer(optimizer, device) if optimizer is not None else None

    def run(phase: str, step: int, fn: Callable[[], object]) -> None:
        try:
            fn()
        except torch.cuda.OutOfMemoryError as error:
            raise PhaseOutOfMemory(phase, step, num_warmup, peak_memory_gib(device), error) from error

    try:
        for step in range(num_warmup + num_steps):
            timed = step >= num_warmup
            if old_logprobs is not None:
                started = synced_clock(device)
                run("old-logprobs pass", step, old_logprobs)
                if timed:
                    times.old_logprobs_s.append(synced_clock(device) - started)
            started = synced_clock(device)
            run("train step", step, train_step)
            seconds = synced_clock(device) - started
            optimizer_seconds = timer.take() if timer is not None else None
            if timed:
                times.train_step_s.append(seconds)
                if optimizer_seconds is not None:
                    times.optimizer_s.append(optimizer_seconds)
    finally:
        if timer is not None:
            timer.remove()
    times.peak_memory_gib = peak_memory_gib(device)
    return times
