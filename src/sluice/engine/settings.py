"""The engine's settings: one record, given as ``--sglang-<name>`` to match SGLang's server flags.

It is a section of the run's config tree (``sluice.config`` imports it into ``Config.engine``), declared here so
the engine package imports nothing from the config package. Each field's ``metadata`` holds what the CLI
generator reads (``help``, and ``choices`` where the values are fixed), the same shape as ``config.sections.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _help(help: str, *, choices: tuple[str, ...] | None = None, secret: bool = False) -> dict:
    """Field metadata read by the CLI generator (``sluice.config.flags``); ``secret``: a value never written to
    saved configs, checkpoints or trackers."""
    metadata: dict = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if secret:
        metadata["secret"] = True
    return metadata


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

    # ---- the HTTP server in front of the engine (sluice serve, the engine servers of a Ray run) ----------------
    api_key: str | None = field(default=None, repr=False, metadata=_help(
        "Key that every route but /health requires, as 'Authorization: Bearer KEY' (SGLang's --api-key). A run "
        "that starts engine servers generates a key of its own when this is unset.", secret=True))
    admin_api_key: str | None = field(default=None, repr=False, metadata=_help(
        "Key that the control and weight routes (weight updates and groups, pause, continue, abort, flush, "
        "memory) require instead of --sglang-api-key; it is accepted on every other route too. Unset: those "
        "routes take --sglang-api-key.", secret=True))
    weight_load_dirs: list[str] = field(default_factory=list, metadata=_help(
        "Directories /update_weights_from_disk may load from, besides the model's own parent directory (a run "
        "adds its weight-sync and checkpoint directories)."))
    max_request_body_mb: float = field(default=64.0, metadata=_help(
        "Largest HTTP request body in MiB; a larger one is refused with 413."))
    max_prompts_per_request: int = field(default=1024, metadata=_help(
        "Most generations one HTTP request may ask for (prompts of a batch x n); more is refused with 400."))
    max_prompt_tokens: int | None = field(default=None, metadata=_help(
        "Longest prompt in tokens one request may send; default: the context length less one. Longer is refused "
        "with 400."))
    max_top_logprobs: int = field(default=20, metadata=_help(
        "Most top-logprob alternatives per output token one request may ask for (/generate's top_logprobs_num, "
        "the OpenAI logprobs and top_logprobs; vLLM's --max-logprobs); more is refused with 400."))
    max_token_ids_logprob: int = field(default=256, metadata=_help(
        "Most token ids one request may name in /generate's token_ids_logprob (each costs one float per reported "
        "position, computed on the engine's step); more is refused with 400."))
    max_queued_requests: int = field(default=4096, metadata=_help(
        "Most requests waiting for a running slot (SGLang's --max-queued-requests); a request that would pass it "
        "is refused with 503 and Retry-After."))
