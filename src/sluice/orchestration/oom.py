"""Out-of-memory errors that say which flags to turn, with their current values.

torch's own message names bytes and allocator internals; what a user can change is a batch size, a token
budget or the engine's share of the device. On a GPU, torch raises ``torch.OutOfMemoryError``; on a CPU, a
plain RuntimeError from the allocator. Both are re-raised as ``torch.OutOfMemoryError`` with the advice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from sluice.config import Config
from sluice.types import SampleGroup, Status

_CPU_OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _CPU_OOM_MARKERS)


def _engine_knobs(config: Config) -> list[str]:
    engine, rollout = config.engine, config.rollout
    return [
        f"--sglang-mem-fraction-static (now {engine.mem_fraction_static}): the engine's share of the device for "
        "weights and KV cache",
        f"--sglang-max-total-tokens (now {engine.max_total_tokens or 'derived'}): the KV pool size",
        f"--sglang-max-running-requests (now {engine.max_running_requests}): sequences decoded together",
        f"--sglang-chunked-prefill-size (now {engine.chunked_prefill_size or 'default'}): tokens per prefill step",
        f"--rollout-max-response-len (now {rollout.rollout_max_response_len})",
    ]


def _train_knobs(config: Config) -> list[str]:
    train = config.train
    if train.use_dynamic_batch_size:
        batch = (f"--max-tokens-per-gpu (now {train.max_tokens_per_gpu or 'derived from free memory'}): tokens per "
                 "packed micro-batch")
    else:
        batch = (f"--micro-batch-size (now {train.micro_batch_size}): sequences per forward/backward pass, or "
                 "--use-dynamic-batch-size with a --max-tokens-per-gpu token budget")
    knobs = [batch]
    if train.recompute_granularity != "full":
        knobs.append(f"--recompute-granularity full (now {train.recompute_granularity or 'off'}): keep only each "
                     "layer's input for the backward pass")
    if train.train_dtype != "bfloat16":
        knobs.append(f"--train-dtype bfloat16 (now {train.train_dtype}): bf16 activations (the float32 master "
                     "weights and moments stay)")
    return [
        *knobs,
        f"--rollout-max-response-len (now {config.rollout.rollout_max_response_len}): the longest sequence trained",
        f"--sglang-mem-fraction-static (now {config.engine.mem_fraction_static}): a smaller engine share leaves "
        "the trainer more where both share one device",
    ]


def _offload_knob(config: Config, stage: str) -> str | None:
    """The offload flag that frees the other pool's memory for ``stage``, where the pools share devices (one
    process, or --colocate) and it is not on yet."""
    cluster = config.cluster
    if cluster.offload or (cluster.distributed and not cluster.colocate):
        return None
    if stage == "train" and not cluster.offload_rollout:
        return ("--offload-rollout (now off): the engines release their KV cache and weights while the trainer "
                "trains (--offload: both turns)")
    if stage != "train" and not cluster.offload_train:
        return ("--offload-train (now off): the trainer's weights and optimizer state move to host memory while "
                "the engines generate (--offload: both turns)")
    return None


def oom_advice(config: Config, stage: str) -> str:
    """What to lower (or turn on) when ``stage`` (engine start, rollout, eval, train) runs out of memory."""
    knobs = _train_knobs(config) if stage == "train" else _engine_knobs(config)
    advice = f"out of memory during {stage}. Lower one of:\n  " + "\n  ".join(knobs)
    offload = _offload_knob(config, stage)
    return advice + (f"\nOr turn on:\n  {offload}" if offload else "")


@contextmanager
def explain_oom(config: Config, stage: str) -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as ``torch.OutOfMemoryError`` naming the knobs."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise torch.OutOfMemoryError(f"{oom_advice(config, stage)}\ntorch: {error}") from error


def raise_if_engine_ran_out(groups: list[SampleGroup], config: Config) -> None:
    """An engine out-of-memory fails the samples it hits one by one (a failed generate call fails its sample);
    it is not a per-sample problem, so stop the run with the advice instead of training on the survivors."""
    for sample in (s for g in groups for s in g.samples if s.status == Status.FAILED):
        error = sample.metadata.get("generate_error", "")
        if "OutOfMemoryError" in error or any(marker in error for marker in _CPU_OOM_MARKERS):
            raise torch.OutOfMemoryError(f"{oom_advice(config, 'rollout')}\nengine: {error}")


@dataclass(frozen=True)
class OomAdvice:
    """``explain_oom`` and ``raise_if_engine_ran_out`` bound to one run's config, for the parts that receive no
    config (rollout.finish.MemoryGuard)."""

    config: Config

    def explain(self, stage: str) -> AbstractContextManager[None]:
        return explain_oom(self.config, stage)

    def check_engines(self, groups: list[SampleGroup]) -> None:
        raise_if_engine_ran_out(groups, self.config)
