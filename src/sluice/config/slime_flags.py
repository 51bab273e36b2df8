"""slime's own flags (slime/utils/arguments.py) that sluice does not take under the same name and meaning, one row
each (see compat_rows.py). Flags slime shares with sluice unchanged are sluice's own config fields (``--help``)."""

from __future__ import annotations

from sluice.config.compat_rows import Row, implemented, mapped, noop, refuse

_HOOKS = "see docs/customization.md for the hook points sluice has"
_MEGATRON_ONLY = "a hook into slime's Megatron backend; sluice's trainer is its own code: " + _HOOKS
_CI = "one of slime's CI self-checks; sluice's checks live in its test suite: drop the flag"
_HF_ONLY = ("sluice loads Hugging Face checkpoints (--hf-checkpoint, --ref-load, --critic-load), not Megatron "
            "checkpoint steps: convert the step with slime's tools/convert_torch_dist_to_hf.py")
_OPD = "on-policy distillation is not in sluice; a teacher's logprobs can be added by a --custom-generate-function-path"
_EVAL_KEYS = ("evaluation reads the same keys and limits as training (--input-key, --label-key, "
              "--rollout-max-prompt-len)")
_EXTERNAL_ROLLOUT = "sluice's rollout runs its own engines (or --agent-function-path programs): drop the flag"
_WEIGHT_SYNC = "use --weight-sync-method in_process | broadcast | disk (with --weight-sync-dir)"
_SINGLE_BACKEND = "sluice has one trainer backend (PyTorch, FSDP2)"

SLIME_FLAGS: dict[str, Row] = {
    # Flags whose sluice meaning is written down here because it differs in detail.
    "--use-kl-loss": implemented("with --kl-loss-coef 0 the KL is computed and logged, not trained on"),
    "--colocate": implemented("Ray pools share devices; a one-process run is colocated (accepted)"),
    "--eval-top-k": implemented("eval top-k; default --rollout-top-k"),
    "--ref-load": implemented("an HF checkpoint directory for the reference model (a Megatron torch_dist "
                              "directory is refused before any model loads)"),
    "--load": implemented("resume from a sluice --save directory (a Megatron torch_dist directory is refused "
                          "before any model loads)"),
    # Cluster and backend.
    "--train-backend": noop("megatron and fsdp both name sluice's one trainer: " + _SINGLE_BACKEND, "value"),
    "--num-gpus-per-node": noop("sluice sizes the engine pool from --rollout-num-gpus and the devices Ray "
                                "reports", "value"),
    "--train-env-vars": refuse("set the environment variables in the shell (or Ray's runtime_env) that starts "
                               "sluice", "value"),
    "--release-train": refuse("use --offload-train: the trainer's weights and optimizer state leave the GPU while "
                              "the engines generate", "switch"),
    "--keep-old-actor": refuse("sluice keeps no second copy of the actor; --use-rollout-logprobs trains against "
                               "the engine's logprobs instead", "switch"),
    "--use-fault-tolerance": refuse("engines are not restarted on failure; a failed sample is counted "
                                    "(--max-failed-sample-ratio)", "switch"),
    "--model-name": noop("sluice reads the model family from config.json's model_type", "value"),
    "--qwen-gdn-backend": refuse("linear-attention (Gated DeltaNet) models are not among sluice's model families",
                                 "value"),
    "--allgather-cp": noop("a context-parallel mode; sluice has no context parallelism (--context-parallel-size 1)",
                           "switch"),
    "--megatron-config-path": refuse(_MEGATRON_ONLY, "value"),
    "--megatron-deepgemm-forward-layers": refuse(_MEGATRON_ONLY, "values"),
    "--megatron-deepgemm-forward-modules": refuse(_MEGATRON_ONLY, "values"),
    "--megatron-deepgemm-moe-forward-layers": refuse(_MEGATRON_ONLY, "values"),
    "--megatron-deepgemm-moe-forward-modules": refuse(_MEGATRON_ONLY, "values"),
    # Checkpoints.
    "--ref-ckpt-step": refuse(_HF_ONLY, "value"),
    "--start-rollout-id": refuse("sluice resumes at the step after the checkpoint it loads (--load); a new run "
                                 "starts at 0", "value"),
    "--reset-optimizer-states": refuse("the AdamW state is kept across rollouts; drop the flag", "switch"),
    "--use-stateless-adam": refuse("sluice's AdamW keeps its moments; use --no-save-optim to leave them out of "
                                   "checkpoints", "switch"),
    "--freeze-params-name-list": refuse("sluice trains every parameter of the actor", "values"),
    "--only-train-params-name-list": refuse("sluice trains every parameter of the actor", "values"),
    # Data.
    "--tool-key": refuse("sluice's tools are Python functions given with --tools", "value"),
    "--multimodal-keys": refuse("sluice trains text-only models", "value"),
    "--disable-rollout-global-dataset": refuse("sluice always reads --prompt-data (or --data-source-path for a "
                                               "custom source)", "switch"),
    "--data-pad-size-multiplier": noop("sluice pads no sequence to a multiple: packed micro-batches hold the real "
                                       "tokens only", "value"),
    "--loss-mask-type": noop("the SFT loss mask comes from the checkpoint's chat template (the assistant turns it "
                             "renders), whatever the tokenizer family", "value"),
    # Batching and rollout.
    "--balance-data": refuse("micro-batches are already formed by token budget (--use-dynamic-batch-size, "
                             "--max-tokens-per-gpu): drop the flag"),
    "--balance-by-flops": refuse("micro-batches are formed by token budget (--max-tokens-per-gpu): drop the flag",
                                 "switch"),
    "--num-steps-per-rollout": refuse("set --global-batch-size to (--rollout-batch-size x --n-samples-per-prompt) "
                                      "/ N for N optimizer steps per rollout"),
    "--log-probs-max-tokens-per-gpu": noop("logprobs are computed with the training token budget "
                                           "(--max-tokens-per-gpu)", "value"),
    "--rollout-max-context-len": refuse("use --sglang-context-length"),
    "--rollout-skip-special-tokens": refuse("responses are decoded without special tokens already; drop the flag"),
    "--rollout-task-type": noop("unused by slime's built-in rollout; sluice's reward is chosen by --rm-type",
                                "value"),
    "--rollout-external-engine-addrs": refuse("sluice starts and syncs its own engines; an outside server cannot "
                                              "receive weight updates from it", "values"),
    "--rollout-buffer-url": refuse(_EXTERNAL_ROLLOUT, "value"),
    "--fetch-trajectory-retry-times": refuse(_EXTERNAL_ROLLOUT, "value"),
    "--min-batch-collection-ratio": refuse(_EXTERNAL_ROLLOUT, "value"),
    "--rollout-data-transport": noop("sluice moves rollout data to the trainer itself (in process, or between its "
                                     "Ray actors); there is no transport to choose", "value"),
    "--use-distributed-post": noop("sluice's rollout manager sends requests with asyncio from one process",
                                   "switch"),
    **{flag: refuse("sluice has no periodic engine health check to tune; a failed request fails its sample "
                    "(--max-failed-sample-ratio)", "value") for flag in (
        "--rollout-health-check-first-wait", "--rollout-health-check-interval", "--rollout-health-check-timeout")},
    "--http-proxy": refuse("sluice's HTTP clients do not go through a proxy to their engines", "value"),
    "--prefill-num-servers": refuse("prefill/decode disaggregation is not in sluice's engine", "value"),
    "--use-rollout-routing-replay": refuse("MoE routing replay: sluice does not train MoE models yet", "switch"),
    "--use-routing-replay": refuse("MoE routing replay: sluice does not train MoE models yet", "switch"),
    # Algorithm.
    "--disable-compute-advantages-and-returns": noop("with --loss-type sft_loss no advantages are computed; refused "
                                                     "with the policy-gradient losses", "switch"),
    "--use-unbiased-kl": refuse("the KL estimator is chosen with --kl-loss-type (k1, k2, k3, or low_var_kl: k3 "
                                "clamped to [-10, 10])", "switch"),
    "--get-mismatch-metrics": noop("the trainer/engine logprob difference is logged whenever the engine returns "
                                   "logprobs (train/rollout_logprob_abs_diff)", "switch"),
    "--use-rollout-entropy": refuse("the entropy is computed from the trainer's logits for --entropy-coef; a "
                                    "rollout-side entropy mask is not in sluice", "switch"),
    "--custom-tis-function-path": refuse("TIS weights come from --use-tis with --tis-mode token | sequence | "
                                         "icepop; a custom weight needs --loss-type custom_loss", "value"),
    "--custom-pg-loss-reducer-function-path": refuse("the reduction is chosen with --loss-agg-mode; a custom one "
                                                     "needs --loss-type custom_loss", "value"),
    "--use-opsm": refuse("off-policy sequence masking is not in sluice; --use-tis --tis-mode icepop masks "
                         "tokens whose importance ratio leaves [--tis-clip-low, --tis-clip]", "switch"),
    "--opsm-delta": refuse("off-policy sequence masking is not in sluice", "value"),
    "--use-opd": refuse(_OPD, "switch"),
    "--opd-type": refuse(_OPD, "value"),
    "--opd-kl-coef": refuse(_OPD, "value"),
    "--opd-teacher-load": refuse(_OPD, "value"),
    "--opd-teacher-ckpt-step": refuse(_OPD, "value"),
    "--recompute-loss-function": noop("with sluice's native model the loss is computed from chunked logprobs "
                                      "(--log-probs-chunk-size), which keep no full-vocabulary activations",
                                      "switch"),
    "--enable-mtp-training": refuse("multi-token prediction layers are not trained by sluice: drop the flag",
                                    "switch"),
    # Eval.
    "--eval-reward-key": refuse("evaluation reads --reward-key; drop the flag"),
    "--eval-input-key": refuse(_EVAL_KEYS, "value"),
    "--eval-label-key": refuse(_EVAL_KEYS, "value"),
    "--eval-tool-key": refuse(_EVAL_KEYS, "value"),
    "--eval-max-prompt-len": refuse(_EVAL_KEYS, "value"),
    "--eval-max-context-len": refuse("use --sglang-context-length", "value"),
    "--eval-min-new-tokens": refuse("sluice's sampling has no minimum length", "value"),
    "--eval-config": refuse("give eval sets as --eval-prompt-data NAME PATH pairs with --eval-* sampling flags",
                            "value"),
    # Hooks slime has and sluice does not (sluice's are listed in docs/customization.md).
    **{flag: refuse("this hook point is not in sluice: " + _HOOKS, "value") for flag in (
        "--custom-convert-samples-to-train-data-path", "--custom-eval-rollout-log-function-path",
        "--custom-rollout-log-function-path", "--custom-reward-post-process-path",
        "--custom-update-weight-post-write-path",
        "--rollout-sample-filter-path", "--rollout-sample-hook-path", "--rollout-all-samples-process-path",
        "--rollout-data-postprocess-path")},
    **{flag: refuse(_MEGATRON_ONLY, "value") for flag in (
        "--custom-megatron-before-log-prob-hook-path", "--custom-megatron-before-train-step-hook-path",
        "--custom-megatron-init-path", "--custom-model-provider-path")},
    # Weight sync.
    "--update-weight-mode": refuse("weight syncs send every parameter (no delta mode): " + _WEIGHT_SYNC, "value"),
    "--update-weight-transport": refuse(_WEIGHT_SYNC, "value"),
    "--update-weight-disk-dir": mapped("--weight-sync-dir", "value"),
    "--update-weight-disk-keep-files": refuse("the disk sync directory is overwritten each sync; drop the flag",
                                              "switch"),
    "--update-weight-local-checkpoint-dir": refuse(_WEIGHT_SYNC, "value"),
    "--update-weight-delta-encoding": refuse("weight syncs send every parameter (no delta mode): " + _WEIGHT_SYNC,
                                             "value"),
    "--update-weight-delta-checksum": refuse("weight syncs send every parameter (no delta mode): " + _WEIGHT_SYNC,
                                             "value"),
    "--check-weight-update-equal": refuse(_CI, "switch"),
    "--ci-test": refuse(_CI, "switch"),
    # Logging and debugging.
    "--wandb-team": refuse("set WANDB_ENTITY in the environment", "value"),
    "--wandb-host": refuse("set WANDB_BASE_URL in the environment", "value"),
    "--wandb-key": refuse("run `wandb login` or set WANDB_API_KEY (sluice never takes keys on the command line, "
                          "where they leak into logs)", "value"),
    "--wandb-run-id": refuse("a run resumed with --load continues the W&B run saved in its checkpoint", "value"),
    "--wandb-dir": refuse("W&B files go under --run-dir", "value"),
    "--wandb-always-use-train-step": noop("every metric of a step is logged with one step number, the rollout "
                                          "step", "switch"),
    "--disable-wandb-random-suffix": noop("sluice does not name W&B runs (W&B picks the name), so there is no "
                                          "suffix to disable", "switch"),
    "--tb-project-name": refuse("use --tensorboard-dir", "value"),
    "--tb-experiment-name": refuse("use --tensorboard-dir", "value"),
    "--log-passrate": refuse("sluice logs eval/<name>/accuracy (the mean over --n-samples-per-eval-prompt "
                             "samples), not pass@n: drop the flag", "switch"),
    "--log-multi-turn": refuse("write samples with --save-debug-rollout-data to inspect their turns", "switch"),
    "--log-correct-samples": refuse("write samples with --save-debug-rollout-data and filter them", "switch"),
    "--log-reward-category": refuse("write samples with --save-debug-rollout-data to see every key of a reward "
                                    "dict", "value"),
    "--dump-details": refuse("use --save-debug-rollout-data for rollouts; train metrics are in "
                             "RUN_DIR/metrics.jsonl", "value"),
    "--save-debug-train-data": refuse("use --save-debug-rollout-data; the trainer's inputs are built from it",
                                      "value"),
    "--load-debug-rollout-data-subsample": refuse("--load-debug-rollout-data replays whole rollouts", "value"),
    "--load-forge-rollout-data": refuse("use --load-debug-rollout-data with files written by "
                                        "--save-debug-rollout-data", "value"),
    "--memory-recorder": refuse("profile with torch.cuda.memory outside sluice", "value"),
    "--memory-snapshot-dir": refuse("profile with torch.cuda.memory outside sluice", "value"),
    "--memory-snapshot-num-steps": refuse("profile with torch.cuda.memory outside sluice", "value"),
    "--profile-target": refuse("profile with torch.profiler or `sluice bench` outside the run", "values"),
    **{flag: refuse(_CI, "value") for flag in (
        "--ci-disable-kl-checker", "--ci-load-grad-norm", "--ci-save-grad-norm",
        "--ci-train-rollout-logprob-abs-diff-threshold")},
}

# slime's built-in plug-ins that its scripts name by dotted path, and sluice's own function for the same job.
SLIME_BUILTIN_HOOKS: dict[str, str] = {
    # slime keeps a group whose reward std exceeds 1e-6; sluice's keeps one whose rewards are not all equal.
    "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std":
        "sluice.rollout.filters.drop_uniform_rewards",
}
