"""SGLang's server flags (``--sglang-*``) and slime's router flags that slime's scripts pass and sluice's engine
has no field for, one row each (see compat_rows.py). The ``--sglang-*`` flags the engine does have are config
fields of the engine section (``--help``); any other ``--sglang-*`` flag is an error that lists them."""

from __future__ import annotations

from sluice.config.compat_rows import Row, mapped, noop, refuse

_REPLICAS = ("engine replicas and expert layouts for large MoE models: sluice runs --rollout-num-gpus / "
             "--rollout-num-gpus-per-engine engines behind its own router; drop the flag")
_SPECULATIVE = "speculative decoding is not in sluice's engine: drop the --sglang-speculative-* flags"
_SPARSE = "DeepSeek sparse attention (GLM-5, DeepSeek-V3.2) is not among sluice's model families"
_ROUTER = "sluice's router is its own (started with the engines, or `sluice serve --router`)"

SGLANG_FLAGS: dict[str, Row] = {
    "--sglang-cuda-graph-bs": mapped("the engine captures CUDA graphs for every batch size up to "
                                     "--sglang-cuda-graph-max-bs: the largest size given becomes that bound",
                                     "values"),
    "--sglang-attention-backend": noop("the engine picks its own attention kernel (paged attention)", "value"),
    "--sglang-watchdog-timeout": noop("the engine runs inside sluice's process (or Ray actor) with no watchdog "
                                      "thread; --update-weights-timeout bounds weight syncs", "value"),
    "--sglang-server-concurrency": mapped("--rollout-max-concurrency, multiplied by the number of engines as in "
                                          "slime (requests in flight per engine)", "value"),
    "--sglang-enable-deterministic-inference": refuse("the engine has no batch-invariant kernels; fix "
                                                      "--rollout-seed for repeatable sampling", "switch"),
    "--sglang-kv-cache-dtype": refuse("the KV cache is kept in the model dtype (--sglang-dtype): drop the flag",
                                      "value"),
    "--sglang-mamba-scheduler-strategy": refuse("hybrid Mamba / linear-attention models are not among sluice's "
                                                "model families", "value"),
    "--sglang-config": refuse("give the --sglang-* flags on the command line, or all flags in a sluice --config "
                              "YAML file", "value"),
    "--sglang-dp-size": refuse(_REPLICAS, "value"),
    "--sglang-enable-dp-attention": refuse(_REPLICAS, "switch"),
    "--sglang-enable-dp-lm-head": refuse(_REPLICAS, "switch"),
    "--sglang-ep-size": refuse(_REPLICAS, "value"),
    "--sglang-expert-parallel-size": refuse(_REPLICAS, "value"),
    "--sglang-moe-dense-tp-size": refuse(_REPLICAS, "value"),
    "--sglang-moe-a2a-backend": refuse(_REPLICAS, "value"),
    "--sglang-deepep-mode": refuse(_REPLICAS, "value"),
    "--sglang-enable-deepep-moe": refuse(_REPLICAS, "switch"),
    "--sglang-pp-size": refuse("engine pipeline parallelism is not in sluice: use --rollout-num-gpus-per-engine "
                               "(tensor parallelism)", "value"),
    "--sglang-pipeline-parallel-size": refuse("engine pipeline parallelism is not in sluice: use "
                                              "--rollout-num-gpus-per-engine (tensor parallelism)", "value"),
    "--sglang-disaggregation-ib-device": refuse("prefill/decode disaggregation is not in sluice's engine", "value"),
    "--sglang-disaggregation-transfer-backend": refuse("prefill/decode disaggregation is not in sluice's engine",
                                                       "value"),
    "--sglang-nsa-prefill-backend": refuse(_SPARSE, "value"),
    "--sglang-nsa-decode-backend": refuse(_SPARSE, "value"),
    "--sglang-speculative-algorithm": refuse(_SPECULATIVE, "value"),
    "--sglang-speculative-num-steps": refuse(_SPECULATIVE, "value"),
    "--sglang-speculative-eagle-topk": refuse(_SPECULATIVE, "value"),
    "--sglang-speculative-num-draft-tokens": refuse(_SPECULATIVE, "value"),
    "--sglang-speculative-draft-attention-backend": refuse(_SPECULATIVE, "value"),
    "--sglang-router-ip": refuse(_ROUTER + "; an outside router cannot be given", "value"),
    "--sglang-router-port": refuse(_ROUTER + "; an outside router cannot be given", "value"),
    "--sglang-router-request-timeout-secs": refuse(_ROUTER + "; requests are bounded by --rollout-max-response-len",
                                                   "value"),
}

# Flag families refused as a whole, with the reason.
SGLANG_PREFIXES: dict[str, str] = {
    "--router-": _ROUTER + "; it takes no sglang-router flags",
}
