"""Megatron-LM's flags that slime's scripts pass (``MODEL_ARGS``, parallel sizes, kernel switches).

sluice reads the model's architecture from the Hugging Face checkpoint, shards with FSDP2 data parallelism and
picks its own kernels, so these flags do not configure anything: the architecture flags are checked against the
checkpoint's config.json before any weights load (megatron_checks.py), the parallel sizes must be 1, and the rest
are accepted no-ops whose help says which behaviour sluice already has. slime_compat.py lists every slime or
Megatron flag and what it does here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NOOP = "Accepted no-op (slime/Megatron compatibility): "
CHECKED = "Megatron architecture flag, checked against the --hf-checkpoint config.json: "


def _meta(help: str, *, choices: tuple[str, ...] | None = None) -> dict:
    return {"help": help, **({"choices": choices} if choices else {})}


@dataclass
class MegatronConfig:
    # Architecture (MODEL_ARGS of slime's scripts/models/*.sh). None / False: not given, nothing to check.
    num_layers: int | None = field(default=None, metadata=_meta(CHECKED + "num_hidden_layers."))
    hidden_size: int | None = field(default=None, metadata=_meta(CHECKED + "hidden_size."))
    ffn_hidden_size: int | None = field(default=None, metadata=_meta(CHECKED + "intermediate_size."))
    num_attention_heads: int | None = field(default=None, metadata=_meta(CHECKED + "num_attention_heads."))
    group_query_attention: bool = field(default=False, metadata=_meta(
        CHECKED + "the checkpoint has fewer key/value heads than query heads."))
    num_query_groups: int | None = field(default=None, metadata=_meta(CHECKED + "num_key_value_heads."))
    kv_channels: int | None = field(default=None, metadata=_meta(
        CHECKED + "head_dim (default hidden_size / num_attention_heads)."))
    swiglu: bool = field(default=False, metadata=_meta(CHECKED + "hidden_act silu (a SwiGLU MLP)."))
    normalization: str | None = field(default=None, metadata=_meta(
        CHECKED + "the supported families use RMSNorm.", choices=("RMSNorm", "LayerNorm")))
    norm_epsilon: float | None = field(default=None, metadata=_meta(CHECKED + "rms_norm_eps."))
    qk_layernorm: bool = field(default=False, metadata=_meta(
        CHECKED + "RMSNorm on queries and keys (Qwen3 has it, Qwen2 and Llama do not)."))
    rotary_base: float | None = field(default=None, metadata=_meta(CHECKED + "rope_theta."))
    vocab_size: int | None = field(default=None, metadata=_meta(
        CHECKED + "vocab_size; both are padded to a multiple of --make-vocab-size-divisible-by before comparing, "
        "as Megatron pads the embedding."))
    make_vocab_size_divisible_by: int = field(default=128, metadata=_meta(
        "Megatron's embedding padding multiple, used only to compare --vocab-size with the checkpoint."))
    untie_embeddings_and_output_weights: bool = field(default=False, metadata=_meta(
        CHECKED + "tie_word_embeddings false."))
    disable_bias_linear: bool = field(default=False, metadata=_meta(
        CHECKED + "no bias in the linear layers (attention_bias / mlp_bias false)."))
    add_qkv_bias: bool = field(default=False, metadata=_meta(
        CHECKED + "bias on the query/key/value projections (Qwen2 has it)."))
    position_embedding_type: str | None = field(default=None, metadata=_meta(
        "Megatron's position embedding; sluice's models use rotary embeddings, so only rope is accepted."))
    use_rotary_position_embeddings: bool = field(default=False, metadata=_meta(
        NOOP + "the supported model families use rotary position embeddings already."))
    rotary_percent: float = field(default=1.0, metadata=_meta(
        "Fraction of each head rotated by RoPE; the supported families rotate all of it, so only 1.0 is accepted."))
    seq_length: int | None = field(default=None, metadata=_meta(
        NOOP + "sequences are packed by token budget (--max-tokens-per-gpu), never padded to a fixed length."))
    max_position_embeddings: int | None = field(default=None, metadata=_meta(
        NOOP + "the context length comes from the checkpoint's config.json."))
    num_experts: int | None = field(default=None, metadata=_meta(CHECKED + "num_experts (MoE)."))
    moe_ffn_hidden_size: int | None = field(default=None, metadata=_meta(CHECKED + "moe_intermediate_size (MoE)."))
    moe_router_topk: int | None = field(default=None, metadata=_meta(CHECKED + "num_experts_per_tok (MoE)."))

    # Parallelism: sluice shards by FSDP2 data parallelism over --actor-num-gpus-per-node x --actor-num-nodes.
    tensor_model_parallel_size: int = field(default=1, metadata=_meta(
        "Megatron tensor parallelism; only 1 (sluice shards parameters with FSDP2 data parallelism instead)."))
    pipeline_model_parallel_size: int = field(default=1, metadata=_meta(
        "Megatron pipeline parallelism; only 1 (sluice shards parameters with FSDP2 data parallelism instead)."))
    context_parallel_size: int = field(default=1, metadata=_meta(
        "Megatron context parallelism; only 1 (long sequences: --recompute-granularity and --log-probs-chunk-size)."))
    expert_model_parallel_size: int = field(default=1, metadata=_meta(
        "Megatron expert parallelism; only 1 until sluice trains MoE models."))
    expert_tensor_parallel_size: int = field(default=1, metadata=_meta(
        "Megatron expert tensor parallelism; only 1 (sluice shards parameters with FSDP2 data parallelism)."))
    sequence_parallel: bool = field(default=False, metadata=_meta(
        NOOP + "Megatron's sequence parallelism splits tensor-parallel activations; sluice has no tensor "
        "parallelism."))
    use_distributed_optimizer: bool = field(default=False, metadata=_meta(
        NOOP + "FSDP2 already shards the optimizer state over the data-parallel ranks."))

    # Numerics and kernels.
    attention_dropout: float = field(default=0.0, metadata=_meta(
        "Dropout on attention probabilities; sluice's models have no dropout (RL needs the trainer's logprobs to "
        "match the engine's), so only 0 is accepted. Megatron's default is 0.1; sluice's is 0."))
    hidden_dropout: float = field(default=0.0, metadata=_meta(
        "Dropout on hidden states; only 0 is accepted, as for --attention-dropout."))
    accumulate_allreduce_grads_in_fp32: bool = field(default=False, metadata=_meta(
        NOOP + "gradients are float32 (the weights are float32 master weights) and reduced in float32."))
    attention_softmax_in_fp32: bool = field(default=False, metadata=_meta(
        NOOP + "sluice's attention kernels compute the softmax in float32."))
    attention_backend: str | None = field(default=None, metadata=_meta(
        NOOP + "sluice picks its own attention kernel (packed variable-length attention).",
        choices=("auto", "flash", "fused", "unfused", "local")))
    bf16: bool = field(default=False, metadata=_meta(
        "Megatron's bf16 training; mapped to --train-dtype bfloat16 (bf16 compute, float32 master weights)."))
    gradient_accumulation_fusion: bool = field(default=True, metadata=_meta(
        NOOP + "a Megatron fused kernel; --no-gradient-accumulation-fusion is accepted and changes nothing."))
    masked_softmax_fusion: bool = field(default=True, metadata=_meta(
        NOOP + "a Megatron fused kernel; --no-masked-softmax-fusion is accepted and changes nothing."))
    bias_swiglu_fusion: bool = field(default=True, metadata=_meta(
        NOOP + "a Megatron fused kernel; --no-bias-swiglu-fusion is accepted and changes nothing."))
    rope_fusion: bool = field(default=True, metadata=_meta(
        NOOP + "a Megatron fused kernel; --no-rope-fusion is accepted and changes nothing."))

    @property
    def gives_architecture(self) -> bool:
        """Whether a MODEL_ARGS set was passed: then its switches (--swiglu, ...) are checked even when absent."""
        return self.num_layers is not None or self.hidden_size is not None
