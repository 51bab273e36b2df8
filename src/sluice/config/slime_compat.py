"""What each slime / Megatron flag of slime's run scripts does in sluice, and the checks and mappings that go with it.

Every flag falls in one of five kinds (``Treatment``): implemented with slime's meaning, mapped to sluice's
equivalent, checked against the checkpoint (Megatron's architecture flags), accepted as a no-op because it names
what sluice already does (said in ``--help`` and logged once at start), or rejected with a message that names the
feature and what to do instead. Flags slime shares with sluice under the same name and meaning are not repeated
here (see ``--help``); docs/migrating-from-slime.md prints this table.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

from sluice.config.sections import Config


class Treatment(str, Enum):
    IMPLEMENTED = "implemented"
    MAPPED = "mapped"
    CHECKED = "checked against the checkpoint"
    NOOP = "accepted no-op"
    REJECTED = "rejected"


_ARCH = ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--group-query-attention",
         "--num-query-groups", "--kv-channels", "--swiglu", "--normalization", "--norm-epsilon", "--qk-layernorm",
         "--rotary-base", "--vocab-size", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
         "--add-qkv-bias", "--num-experts", "--moe-ffn-hidden-size", "--moe-router-topk")

FLAGS: dict[str, tuple[Treatment, str]] = {
    **{flag: (Treatment.CHECKED, "compared with config.json before any weights load; a mismatch names both values")
       for flag in _ARCH},
    "--make-vocab-size-divisible-by": (Treatment.IMPLEMENTED, "the padding multiple used to compare --vocab-size"),
    "--position-embedding-type": (Treatment.CHECKED, "rope accepted; other types refused (sluice's models use RoPE)"),
    "--rotary-percent": (Treatment.CHECKED, "1.0 accepted; partial rotary refused"),
    "--use-rotary-position-embeddings": (Treatment.NOOP, "the supported families use RoPE already"),
    "--seq-length": (Treatment.NOOP, "sequences are packed by token budget, never padded to a fixed length"),
    "--max-position-embeddings": (Treatment.NOOP, "the context length comes from config.json"),
    "--tensor-model-parallel-size": (Treatment.CHECKED, "1 accepted; larger refused (sluice shards with FSDP2)"),
    "--pipeline-model-parallel-size": (Treatment.CHECKED, "1 accepted; larger refused (sluice shards with FSDP2)"),
    "--context-parallel-size": (Treatment.CHECKED, "1 accepted; larger refused"),
    "--expert-model-parallel-size": (Treatment.CHECKED, "1 accepted; larger refused until MoE training lands"),
    "--expert-tensor-parallel-size": (Treatment.CHECKED, "1 accepted; larger refused (sluice shards with FSDP2)"),
    "--sequence-parallel": (Treatment.NOOP, "Megatron splits tensor-parallel activations; sluice has no TP"),
    "--use-distributed-optimizer": (Treatment.NOOP, "FSDP2 shards the optimizer state already"),
    "--attention-dropout": (Treatment.CHECKED, "0 accepted (sluice's default; Megatron's is 0.1); nonzero refused"),
    "--hidden-dropout": (Treatment.CHECKED, "0 accepted (sluice's default; Megatron's is 0.1); nonzero refused"),
    "--accumulate-allreduce-grads-in-fp32": (Treatment.NOOP, "gradients are float32 and reduced in float32"),
    "--attention-softmax-in-fp32": (Treatment.NOOP, "sluice's attention computes the softmax in float32"),
    "--attention-backend": (Treatment.NOOP, "sluice picks its own attention kernel"),
    "--no-gradient-accumulation-fusion": (Treatment.NOOP, "a Megatron fused kernel"),
    "--no-masked-softmax-fusion": (Treatment.NOOP, "a Megatron fused kernel"),
    "--no-bias-swiglu-fusion": (Treatment.NOOP, "a Megatron fused kernel"),
    "--no-rope-fusion": (Treatment.NOOP, "a Megatron fused kernel"),
    "--bf16": (Treatment.MAPPED, "--train-dtype bfloat16 (bf16 compute, float32 master weights)"),
    "--optimizer": (Treatment.IMPLEMENTED, "adam (AdamW) accepted; others refused"),
    "--lr-decay-style": (Treatment.IMPLEMENTED, "constant, linear or cosine, as Megatron defines them"),
    "--lr-decay-iters": (Treatment.IMPLEMENTED, "optimizer steps to the end of the decay"),
    "--lr-warmup-fraction": (Treatment.IMPLEMENTED, "warmup as a fraction of --lr-decay-iters"),
    "--lr-warmup-iters": (Treatment.IMPLEMENTED, "optimizer steps of linear warmup"),
    "--lr-warmup-init": (Treatment.IMPLEMENTED, "learning rate the warmup starts from"),
    "--min-lr": (Treatment.IMPLEMENTED, "learning rate at the end of the decay"),
    "--calculate-per-token-loss": (Treatment.MAPPED, "--loss-agg-mode token_mean (the default)"),
    "--use-kl-loss": (Treatment.IMPLEMENTED, "with --kl-loss-coef 0 the KL is computed and logged, not trained on"),
    "--colocate": (Treatment.IMPLEMENTED, "Ray pools share devices; a one-process run is colocated (accepted)"),
    "--eval-top-k": (Treatment.IMPLEMENTED, "eval top-k; default --rollout-top-k"),
    "--ref-load": (Treatment.IMPLEMENTED, "an HF checkpoint directory for the reference model"),
    "--load": (Treatment.IMPLEMENTED, "resume from a sluice --save directory"),
    "--balance-data": (Treatment.REJECTED, "micro-batches are already formed by token budget "
                       "(--use-dynamic-batch-size, --max-tokens-per-gpu): drop the flag"),
    "--num-steps-per-rollout": (Treatment.REJECTED, "set --global-batch-size to (--rollout-batch-size x "
                                "--n-samples-per-prompt) / N for N optimizer steps per rollout"),
    "--eval-reward-key": (Treatment.REJECTED, "evaluation reads --reward-key; drop the flag"),
    "--rollout-max-context-len": (Treatment.REJECTED, "use --sglang-context-length"),
    "--rollout-skip-special-tokens": (Treatment.REJECTED, "responses are decoded without special tokens already; "
                                      "drop the flag"),
    "--tool-key": (Treatment.REJECTED, "sluice's tools are Python functions given with --tools"),
    "--loss-mask-type": (Treatment.NOOP, "the SFT loss mask comes from the checkpoint's chat template"),
    "--disable-compute-advantages-and-returns": (Treatment.NOOP, "--loss-type sft_loss computes no advantages "
                                                 "(refused with other loss types)"),
    "--optimizer-cpu-offload": (Treatment.REJECTED, "use --offload-train (moves the optimizer state off the GPU "
                                "while the engines generate)"),
}

# Prefixes of flag families that are rejected as a whole, with the reason.
REJECTED_PREFIXES: dict[str, str] = {
    "--moe-": "sluice does not train MoE models yet; --num-experts, --moe-ffn-hidden-size and --moe-router-topk "
              "are checked against the checkpoint, the other --moe-* flags are refused until MoE lands",
    "--router-": "sluice's router is its own (sluice serve --router); it takes no sglang-router flags",
}

_PARALLEL = (("--tensor-model-parallel-size", "tensor_model_parallel_size"),
             ("--pipeline-model-parallel-size", "pipeline_model_parallel_size"),
             ("--context-parallel-size", "context_parallel_size"),
             ("--expert-tensor-parallel-size", "expert_tensor_parallel_size"))


def rejection(flag: str) -> str | None:
    """Why a rejected slime / Megatron flag is refused and what to do instead; None for any other flag."""
    entry = FLAGS.get(flag)
    if entry and entry[0] is Treatment.REJECTED:
        return f"{flag} is slime's, and sluice does not take it: {entry[1]}"
    for prefix, reason in REJECTED_PREFIXES.items():
        if flag.startswith(prefix):
            return f"{flag} is slime's or Megatron's, and sluice does not take it: {reason}"
    return None


def resolve(config: Config) -> None:
    """Applies the mapped flags in place: --calculate-per-token-loss, --bf16, and --lr-decay-iters' default."""
    if config.algorithm.calculate_per_token_loss:
        config.algorithm.loss_agg_mode = "token_mean"
    if config.megatron.bf16:
        config.train.train_dtype = "bfloat16"
    train, rollout = config.train, config.rollout
    if train.lr_decay_iters is None and rollout.num_rollout and config.global_batch_size:
        train.lr_decay_iters = rollout.num_rollout * config.samples_per_rollout // config.global_batch_size


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
        "--loss-mask-type": config.data.loss_mask_type is not None,
        "--disable-compute-advantages-and-returns": config.algorithm.disable_compute_advantages_and_returns,
    }
    return [f"{flag} accepted and ignored: {FLAGS[flag][1]}" for flag, on in given.items() if on]
