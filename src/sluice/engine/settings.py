"""The engine's settings: one record, given as ``--sglang-<name>`` to match SGLang's server flags.

It is a section of the run's config tree (``sluice.config`` imports it into ``Config.engine``), declared here so
the engine package imports nothing from the config package. Each field's ``metadata`` holds what the CLI
generator reads (``help``, and ``choices`` where the values are fixed), the same shape as ``config.sections.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _help(help: str, *, choices: tuple[str, ...] | None = None) -> dict:
    """Field metadata read by the CLI generator (``sluice.config.flags``)."""
    return {"help": help} if choices is None else {"help": help, "choices": choices}


@dataclass
class EngineConfig:
    """Settings of our inference engine, given as --sglang-<name> to match SGLang's server flags."""

    mem_fraction_static: float = field(default=0.8, metadata=_help(
        "Fraction of the accelerator's memory for the weights plus the paged KV pool (what other processes and "
        "the weights already use is subtracted); the rest is left to activations and CUDA graphs."))
    max_total_tokens: int | None = field(default=None, metadata=_help(
        "KV pool size in tokens; overrides --sglang-mem-fraction-static. Default on CPU: 65536 (or context "
        "length x max running requests if smaller)."))
    page_size: int = field(default=16, metadata=_help("Tokens per KV page; prefixes are shared in whole pages."))
    context_length: int | None = field(default=None, metadata=_help(
        "Longest sequence (prompt + output); default: the model's max_position_embeddings."))
    chunked_prefill_size: int | None = field(default=None, metadata=_help(
        "Token budget of one engine step: prompts longer than the budget are prefilled in chunks. Default: 8192 "
        "on GPU, 4096 on CPU; raised to --sglang-max-running-requests if below it."))
    disable_radix_cache: bool = field(default=False, metadata=_help(
        "Turn off prefix caching (the n samples of a group then each prefill their prompt)."))
    disable_cuda_graph: bool = field(default=False, metadata=_help("Run decode steps eagerly on GPU."))
    disable_overlap_schedule: bool = field(default=False, metadata=_help(
        "On GPU, read each step's tokens back before scheduling the next step (by default the next step is "
        "scheduled and launched while the device computes, and the tokens are read one step later)."))
    skip_tokenizer_init: bool = field(default=False, metadata=_help(
        "Serve token ids only: no tokenizer is loaded, outputs carry no text, stop strings are refused."))
    cuda_graph_max_bs: int | None = field(default=None, metadata=_help(
        "Largest decode batch replayed from a CUDA graph; default min(512, --sglang-max-running-requests)."))
    dtype: str = field(default="auto", metadata=_help(
        "Engine dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16.",
        choices=("auto", "float32", "bfloat16")))
    max_running_requests: int = field(default=256, metadata=_help("Most sequences decoded together."))
    device: str = field(default="auto", metadata=_help("Engine device: auto, cpu or cuda[:N]."))
