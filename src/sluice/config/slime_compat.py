"""What each slime / Megatron / SGLang flag of slime's parser and run scripts does in sluice, with the checks and
mappings that go with it.

Every flag falls in one of five kinds (``Treatment``): implemented with slime's meaning, mapped to sluice's
equivalent, checked against the checkpoint (Megatron's architecture flags), accepted as a no-op because it names
what sluice already does (said in ``--help`` and logged once at start), or rejected with a message that names the
feature and what to do instead. The rows live in one table per origin: megatron_flags.py, slime_flags.py and
sglang_flags.py. Flags slime shares with sluice under the same name and meaning are sluice's own config fields and
not repeated there (see ``--help``); docs/migrating-from-slime.md prints the tables.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from sluice.config.compat_rows import Row, Treatment
from sluice.config.megatron_flags import MEGATRON_FLAGS, MEGATRON_PREFIXES
from sluice.config.sections import Config
from sluice.config.sglang_flags import SGLANG_FLAGS, SGLANG_PREFIXES
from sluice.config.slime_flags import SLIME_BUILTIN_HOOKS, SLIME_FLAGS
from sluice.errors import ConfigError

__all__ = ["FLAGS", "REJECTED_PREFIXES", "Row", "Treatment", "compat_arguments", "noop_notes", "problems",
           "rejection", "resolve"]

FLAGS: dict[str, Row] = {**MEGATRON_FLAGS, **SLIME_FLAGS, **SGLANG_FLAGS}
REJECTED_PREFIXES: dict[str, str] = {**MEGATRON_PREFIXES, **SGLANG_PREFIXES}

_PARALLEL = (("--tensor-model-parallel-size", "tensor_model_parallel_size"),
             ("--pipeline-model-parallel-size", "pipeline_model_parallel_size"),
             ("--context-parallel-size", "context_parallel_size"),
             ("--expert-tensor-parallel-size", "expert_tensor_parallel_size"))


def _origin(flag: str) -> str:
    if flag in SGLANG_FLAGS or flag.startswith("--sglang-"):
        return "an SGLang flag"
    if flag in MEGATRON_FLAGS or flag.startswith("--moe-"):
        return "a Megatron flag"
    return "a slime flag"


def rejection(flag: str) -> str | None:
    """Why a rejected slime / Megatron / SGLang flag is refused and what to do instead; None for any other flag."""
    row = FLAGS.get(flag)
    if row and row.treatment is Treatment.REJECTED:
        return f"{flag} is {_origin(flag)} that sluice does not take: {row.note}"
    for prefix, reason in REJECTED_PREFIXES.items():
        if flag.startswith(prefix):
            return f"{flag} is {_origin(flag)} that sluice does not take: {reason}"
    return None


def compat_arguments(own_flags: set[str]) -> Iterator[tuple[str, Row]]:
    """The no-op and mapped rows without a config field of that name: the parser adds them from their ``takes``."""
    for flag, row in FLAGS.items():
        if row.treatment in (Treatment.NOOP, Treatment.MAPPED) and flag not in own_flags:
            if not row.takes:
                raise TypeError(f"{flag}: a table row without a config field needs takes=switch|value|values")
            yield flag, row


def resolve(config: Config, command_line: Collection[str] = ()) -> None:
    """Applies the mapped flags in place: --calculate-per-token-loss, --bf16, --sglang-cuda-graph-bs,
    --sglang-server-concurrency, --update-weight-disk-dir, slime's built-in filter path, and --lr-decay-iters'
    default. ``command_line``: the config keys given as flags (a mapped flag must not silently replace one)."""
    if config.algorithm.calculate_per_token_loss:
        config.algorithm.loss_agg_mode = "token_mean"
    if config.megatron.bf16:
        config.train.train_dtype = "bfloat16"
    given = config.compat_flags
    if "--sglang-cuda-graph-bs" in given:
        config.engine.cuda_graph_max_bs = max(_ints("--sglang-cuda-graph-bs", given["--sglang-cuda-graph-bs"]))
    if "--sglang-server-concurrency" in given:
        per_engine = _ints("--sglang-server-concurrency", given["--sglang-server-concurrency"])[0]
        total = per_engine * config.cluster.num_engines
        explicit = config.rollout.rollout_max_concurrency
        if "rollout_max_concurrency" in command_line and explicit != total:
            raise ConfigError(f"--sglang-server-concurrency {per_engine} (x {config.cluster.num_engines} engine(s) = "
                              f"{total} requests in flight) disagrees with --rollout-max-concurrency {explicit}: "
                              "give one of them")
        config.rollout.rollout_max_concurrency = total
    if "--update-weight-disk-dir" in given:
        config.sync.weight_sync_dir = given["--update-weight-disk-dir"][0]
    rollout = config.rollout
    rollout.dynamic_sampling_filter_path = SLIME_BUILTIN_HOOKS.get(rollout.dynamic_sampling_filter_path,
                                                                   rollout.dynamic_sampling_filter_path)
    train, rollout = config.train, config.rollout
    if train.lr_decay_iters is None and rollout.num_rollout and config.global_batch_size:
        train.lr_decay_iters = rollout.num_rollout * config.samples_per_rollout // config.global_batch_size


def _ints(flag: str, words: list[str]) -> list[int]:
    try:
        return [int(word) for word in words]
    except ValueError:
        raise ConfigError(f"{flag} takes integers, got {' '.join(words)!r}") from None


def problems(config: Config) -> Iterator[str]:
    """The config checks of the Megatron flags and the schedule; each message starts with its flag."""
    mega, train = config.megatron, config.train
    for flag, name in _PARALLEL:
        size = getattr(mega, name)
        if size != 1:
            yield (f"{flag} {size}: sluice has no Megatron model parallelism; it shards parameters, gradients and "
                   "optimizer state with FSDP2 over the data-parallel ranks (--actor-num-gpus-per-node x "
                   f"--actor-num-nodes): use {flag} 1 and more data-parallel GPUs")
    if mega.expert_model_parallel_size != 1:
        yield (f"--expert-model-parallel-size {mega.expert_model_parallel_size}: sluice does not train MoE models "
               "yet, so there are no experts to place; use 1")
    for flag, value in (("--attention-dropout", mega.attention_dropout), ("--hidden-dropout", mega.hidden_dropout)):
        if value != 0:
            yield (f"{flag} {value}: sluice's models have no dropout (RL compares the trainer's logprobs with the "
                   f"engine's, which dropout would perturb); use {flag} 0")
    if mega.position_embedding_type not in (None, "rope"):
        yield f"--position-embedding-type {mega.position_embedding_type}: sluice's models use rope only"
    if mega.rotary_percent != 1.0:
        yield f"--rotary-percent {mega.rotary_percent}: sluice's models rotate the whole head (1.0)"
    if mega.make_vocab_size_divisible_by < 1:
        yield f"--make-vocab-size-divisible-by must be >= 1, got {mega.make_vocab_size_divisible_by}"
    if "--disable-compute-advantages-and-returns" in config.compat_flags and config.algorithm.loss_type != "sft_loss":
        yield ("--disable-compute-advantages-and-returns: sluice skips advantages only for --loss-type sft_loss; "
               f"--loss-type {config.algorithm.loss_type} trains on them (a custom estimator: "
               "--custom-advantage-function-path)")
    yield from _schedule(train)


def _schedule(train) -> Iterator[str]:
    if train.optimizer != "adam":
        yield (f"--optimizer {train.optimizer}: sluice trains with AdamW (Megatron's adam, with decoupled "
               "--weight-decay); use --optimizer adam")
    if train.min_lr < 0 or train.min_lr > train.lr:
        yield f"--min-lr must be in [0, --lr {train.lr}], got {train.min_lr}"
    if train.lr_warmup_fraction is not None:
        if not 0 <= train.lr_warmup_fraction <= 1:
            yield f"--lr-warmup-fraction must be in [0, 1], got {train.lr_warmup_fraction}"
        if not train.lr_decay_iters:
            yield "--lr-warmup-fraction is a fraction of --lr-decay-iters: set it (or --num-rollout, its default)"
    if train.lr_decay_iters is not None and train.lr_decay_iters < 1:
        yield f"--lr-decay-iters must be >= 1, got {train.lr_decay_iters}"
    if train.lr_decay_style != "constant" and not train.lr_decay_iters:
        yield (f"--lr-decay-style {train.lr_decay_style} decays over --lr-decay-iters optimizer steps: set it "
               "(or --num-rollout, from which it is derived)")
    if (train.lr_decay_style != "constant" and train.lr_decay_iters and train.lr_warmup_fraction is None
            and train.lr_warmup_iters > train.lr_decay_iters):  # a constant rate after warmup never decays
        yield (f"--lr-warmup-iters {train.lr_warmup_iters} is longer than --lr-decay-iters {train.lr_decay_iters}")


def noop_notes(config: Config) -> list[str]:
    """One line per accepted no-op flag that was given, for the start of the run's log."""
    mega = config.megatron
    given = {
        "--use-rotary-position-embeddings": mega.use_rotary_position_embeddings,
        "--seq-length": mega.seq_length is not None,
        "--max-position-embeddings": mega.max_position_embeddings is not None,
        "--sequence-parallel": mega.sequence_parallel,
        "--use-distributed-optimizer": mega.use_distributed_optimizer,
        "--accumulate-allreduce-grads-in-fp32": mega.accumulate_allreduce_grads_in_fp32,
        "--attention-softmax-in-fp32": mega.attention_softmax_in_fp32,
        "--attention-backend": mega.attention_backend is not None,
        "--no-gradient-accumulation-fusion": not mega.gradient_accumulation_fusion,
        "--no-masked-softmax-fusion": not mega.masked_softmax_fusion,
        "--no-bias-swiglu-fusion": not mega.bias_swiglu_fusion,
        "--no-rope-fusion": not mega.rope_fusion,
        **{flag: FLAGS[flag].treatment is Treatment.NOOP for flag in config.compat_flags},
    }
    notes = [f"{flag} accepted and ignored: {FLAGS[flag].note}" for flag, on in given.items() if on]
    return notes + _loss_aggregation_note(config)


def _loss_aggregation_note(config: Config) -> list[str]:
    """slime without --calculate-per-token-loss averages each sample's tokens, then the samples; sluice's default
    --loss-agg-mode is token_mean. A slime script (it passes Megatron's architecture flags or another slime-only
    flag) that leaves both out trains differently here: said once at start, not changed behind its back."""
    algo, mega = config.algorithm, config.megatron
    from_slime = bool(config.compat_flags) or mega.num_layers is not None or mega.hidden_size is not None
    if not from_slime or algo.calculate_per_token_loss or algo.loss_type == "sft_loss":
        return []
    if algo.loss_agg_mode != "token_mean":  # chosen explicitly
        return []
    return ["--calculate-per-token-loss not given: slime would average the loss per sample, then over samples; "
            "sluice averages over all tokens (--loss-agg-mode token_mean). Pass --loss-agg-mode "
            "seq_mean_token_mean for slime's aggregation, or --calculate-per-token-loss to say token_mean was meant"]
