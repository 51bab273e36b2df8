"""Megatron-LM's flags that slime's scripts pass, one row each: what sluice does with them (see compat_rows.py).

sluice reads the architecture from the HF checkpoint, shards with FSDP2 and has its own model code and kernels:
architecture flags are checked against config.json, kernel and fusion switches are no-ops, and features of model
families sluice does not have (multi-latent attention, multi-token prediction, gated attention) are refused.
"""

from __future__ import annotations

from sluice.config.compat_rows import Row, checked, implemented, mapped, noop, refuse

_ARCH = ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--group-query-attention",
         "--num-query-groups", "--kv-channels", "--swiglu", "--normalization", "--norm-epsilon", "--qk-layernorm",
         "--rotary-base", "--vocab-size", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
         "--add-qkv-bias", "--num-experts", "--moe-ffn-hidden-size", "--moe-router-topk")
_KERNEL = "a Megatron fused kernel switch; sluice has its own kernels"
_MLA = ("multi-latent attention (DeepSeek-V3/R1, Kimi-K2, GLM-5, Moonlight) is not among sluice's model families "
        "(Qwen2/2.5, Qwen3, Llama): train one of those")
_MTP = "multi-token prediction layers are not trained by sluice: drop the flag"
_GATED = ("gated attention and linear-attention hybrids (Qwen3-Next, Qwen3.5) are not among sluice's model "
          "families: train a Qwen3, Qwen2.5 or Llama checkpoint")
_PIPELINE = "a pipeline-stage layout; sluice has no pipeline parallelism (FSDP2 shards every layer): drop the flag"

MEGATRON_FLAGS: dict[str, Row] = {
    **{flag: checked("compared with config.json before any weights load; a mismatch names both values")
       for flag in _ARCH},
    "--make-vocab-size-divisible-by": implemented("the padding multiple used to compare --vocab-size"),
    "--position-embedding-type": checked("rope accepted; other types refused (sluice's models use RoPE)"),
    "--rotary-percent": checked("1.0 accepted; partial rotary refused"),
    "--use-rotary-position-embeddings": noop("the supported families use RoPE already"),
    "--no-position-embedding": noop("no learned absolute position embedding: the families use RoPE", "switch"),
    "--seq-length": noop("sequences are packed by token budget, never padded to a fixed length"),
    "--max-position-embeddings": noop("the context length comes from config.json"),
    "--tensor-model-parallel-size": checked("1 accepted; larger refused (sluice shards with FSDP2)"),
    "--pipeline-model-parallel-size": checked("1 accepted; larger refused (sluice shards with FSDP2)"),
    "--context-parallel-size": checked("1 accepted; larger refused"),
    "--expert-model-parallel-size": checked("1 accepted; larger refused until MoE training lands"),
    "--expert-tensor-parallel-size": checked("1 accepted; larger refused (sluice shards with FSDP2)"),
    "--decoder-first-pipeline-num-layers": refuse(_PIPELINE),
    "--decoder-last-pipeline-num-layers": refuse(_PIPELINE),
    "--sequence-parallel": noop("Megatron splits tensor-parallel activations; sluice has no TP"),
    "--use-distributed-optimizer": noop("FSDP2 shards the optimizer state already"),
    "--attention-dropout": checked("0 accepted (sluice's default; Megatron's is 0.1); nonzero refused"),
    "--hidden-dropout": checked("0 accepted (sluice's default; Megatron's is 0.1); nonzero refused"),
    "--accumulate-allreduce-grads-in-fp32": noop("gradients are float32 and reduced in float32"),
    "--attention-softmax-in-fp32": noop("sluice's attention computes the softmax in float32"),
    "--attention-backend": noop("sluice picks its own attention kernel"),
    "--transformer-impl": noop("sluice runs its own model code (models/), neither Transformer Engine nor Megatron's "
                               "local layers", "value"),
    "--no-gradient-accumulation-fusion": noop(_KERNEL),
    "--no-masked-softmax-fusion": noop(_KERNEL),
    "--no-bias-swiglu-fusion": noop(_KERNEL),
    "--no-rope-fusion": noop(_KERNEL),
    "--no-check-for-nan-in-loss-and-grad": noop("sluice always checks: a step with a non-finite loss or gradient "
                                                "norm is skipped (--max-consecutive-nonfinite-steps)", "switch"),
    "--enable-experimental": noop("Megatron's gate for experimental features; nothing in sluice is behind it",
                                  "switch"),
    "--bf16": mapped("--train-dtype bfloat16 (bf16 compute, float32 master weights)"),
    "--fp8-format": refuse("FP8 training: sluice trains in bfloat16 or float32 (--train-dtype); drop the flag",
                           "value"),
    "--fp8-recipe": refuse("FP8 training: sluice trains in bfloat16 or float32 (--train-dtype); drop the flag",
                           "value"),
    "--fp8-param-gather": refuse("FP8 training: sluice trains in bfloat16 or float32 (--train-dtype); drop the flag",
                                 "switch"),
    "--deterministic-mode": refuse("Megatron's deterministic kernels: sluice has no deterministic mode; fix "
                                   "--seed and --rollout-seed for repeatable data and sampling", "switch"),
    "--optimizer": implemented("adam (AdamW) accepted; others refused"),
    "--optimizer-cpu-offload": implemented("float32 masters and AdamW moments in host memory, AdamW stepped there "
                                           "(trainer/host_optimizer.py)"),
    "--overlap-cpu-optimizer-d2h-h2d": noop("with --optimizer-cpu-offload the gradient and weight copies always "
                                            "overlap the host's AdamW step", "switch"),
    "--use-precision-aware-optimizer": noop("sluice keeps float32 master weights and AdamW moments; there is no "
                                            "reduced-precision optimizer state to choose", "switch"),
    "--lr-decay-style": implemented("constant, linear or cosine, as Megatron defines them"),
    "--lr-decay-iters": implemented("optimizer steps to the end of the decay"),
    "--lr-warmup-fraction": implemented("warmup as a fraction of --lr-decay-iters"),
    "--lr-warmup-iters": implemented("optimizer steps of linear warmup"),
    "--lr-warmup-init": implemented("learning rate the warmup starts from"),
    "--min-lr": implemented("learning rate at the end of the decay"),
    "--calculate-per-token-loss": mapped("--loss-agg-mode token_mean (the default)"),
    "--multi-latent-attention": refuse(_MLA, "switch"),
    "--q-lora-rank": refuse(_MLA, "value"),
    "--kv-lora-rank": refuse(_MLA, "value"),
    "--qk-head-dim": refuse(_MLA, "value"),
    "--qk-pos-emb-head-dim": refuse(_MLA, "value"),
    "--v-head-dim": refuse(_MLA, "value"),
    "--rotary-scaling-factor": refuse("YaRN rotary scaling (DeepSeek-V3 family): " + _MLA, "value"),
    "--mscale": refuse("YaRN rotary scaling (DeepSeek-V3 family): " + _MLA, "value"),
    "--mscale-all-dim": refuse("YaRN rotary scaling (DeepSeek-V3 family): " + _MLA, "value"),
    "--mtp-num-layers": refuse(_MTP, "value"),
    "--mtp-loss-scaling-factor": refuse(_MTP, "value"),
    "--attention-output-gate": refuse(_GATED, "switch"),
    "--use-gated-attention": refuse(_GATED, "switch"),
    "--apply-layernorm-1p": refuse("zero-centred (1 + weight) norms (Qwen3-Next, Qwen3.5): " + _GATED, "switch"),
    "--post-self-attn-layernorm": refuse("extra norms after attention and MLP (GLM-4 dense) are not in sluice's "
                                         "model families (Qwen2/2.5, Qwen3, Llama)", "switch"),
    "--post-mlp-layernorm": refuse("extra norms after attention and MLP (GLM-4 dense) are not in sluice's model "
                                   "families (Qwen2/2.5, Qwen3, Llama)", "switch"),
    "--rotary-interleaved": refuse("interleaved RoPE pairs (GLM-4): sluice's models rotate half-split pairs "
                                   "(Qwen2/2.5, Qwen3, Llama)", "switch"),
    "--spec": refuse("a Megatron layer-spec module for a custom model: sluice's model code is its own (Qwen2/2.5, "
                     "Qwen3, Llama); drop the flag for those families", "values"),
}

# Flag families refused as a whole, with the reason.
MEGATRON_PREFIXES: dict[str, str] = {
    "--moe-": "sluice does not train MoE models yet; --num-experts, --moe-ffn-hidden-size and --moe-router-topk "
              "are checked against the checkpoint, the other --moe-* flags are refused until MoE lands",
}
