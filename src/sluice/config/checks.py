"""Cross-field checks of a Config, run before any model is loaded so a bad run fails in seconds.

Each check yields messages that start with the flag(s) to change; ``validate`` reports all of them
at once so one edit can fix every problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from sluice.errors import ConfigError
from sluice.config.sections import (
    BUILTIN_REWARDS,
    DEFAULT_MAX_TURNS,
    GRPO_STD_ESTIMATORS,
    LABEL_FREE_REWARDS,
    TOKEN_LEVEL_ESTIMATORS,
    Config,
)
from sluice.config.sft_checks import sft_problems
from sluice.config.slime_compat import problems as slime_compat_problems


def _batches(config: Config) -> Iterator[str]:
    rollout, train = config.rollout, config.train
    if rollout.rollout_batch_size is not None and rollout.rollout_batch_size <= 0:
        yield f"--rollout-batch-size must be > 0, got {rollout.rollout_batch_size}"
    if rollout.n_samples_per_prompt < 1:
        yield f"--n-samples-per-prompt must be >= 1, got {rollout.n_samples_per_prompt}"
    if train.micro_batch_size < 1:
        yield f"--micro-batch-size must be >= 1, got {train.micro_batch_size}"
    if train.global_batch_size is not None and train.global_batch_size <= 0:
        yield f"--global-batch-size must be > 0, got {train.global_batch_size}"
    elif config.samples_per_rollout > 0 and config.samples_per_rollout % config.global_batch_size:
        yield (f"--global-batch-size {config.global_batch_size} must divide --rollout-batch-size x "
               f"--n-samples-per-prompt = {config.samples_per_rollout}")


def _rollout(config: Config) -> Iterator[str]:
    rollout = config.rollout
    if rollout.rollout_max_response_len < 1:
        yield f"--rollout-max-response-len must be >= 1, got {rollout.rollout_max_response_len}"
    if rollout.num_rollout is not None and rollout.num_rollout < 1:
        yield f"--num-rollout must be >= 1, got {rollout.num_rollout}"
    if rollout.num_epoch < 1:
        yield f"--num-epoch must be >= 1, got {rollout.num_epoch}"
    if rollout.rollout_max_concurrency < 1:
        yield f"--rollout-max-concurrency must be >= 1, got {rollout.rollout_max_concurrency}"
    if config.data.rollout_max_prompt_len is not None and config.data.rollout_max_prompt_len < 1:
        yield f"--rollout-max-prompt-len must be >= 1, got {config.data.rollout_max_prompt_len}"
    if rollout.over_sampling_batch_size is not None and rollout.over_sampling_batch_size < 1:
        yield f"--over-sampling-batch-size must be >= 1, got {rollout.over_sampling_batch_size}"
    if rollout.max_staleness is not None and rollout.max_staleness < 0:
        yield f"--max-staleness must be >= 0 (0: on-policy), got {rollout.max_staleness}"


def _sampling(config: Config) -> Iterator[str]:
    rollout, ev = config.rollout, config.eval
    if not rollout.rollout_temperature > 0:
        yield f"--rollout-temperature must be > 0, got {rollout.rollout_temperature}"
    if ev.eval_temperature is not None and not ev.eval_temperature >= 0:
        yield f"--eval-temperature must be >= 0 (0: greedy), got {ev.eval_temperature}"
    for flag, top_p in (("--rollout-top-p", rollout.rollout_top_p), ("--eval-top-p", ev.eval_top_p)):
        if top_p is not None and not 0 < top_p <= 1:
            yield f"{flag} must be in (0, 1], got {top_p}"
    if rollout.rollout_top_k != -1 and rollout.rollout_top_k < 1:
        yield f"--rollout-top-k must be -1 (off) or >= 1, got {rollout.rollout_top_k}"


def _algorithm(config: Config) -> Iterator[str]:
    algo = config.algorithm
    if not algo.eps_clip > 0:
        yield f"--eps-clip must be > 0, got {algo.eps_clip}"
    if algo.eps_clip_high is not None and not algo.eps_clip_high >= 0:
        yield f"--eps-clip-high must be >= 0, got {algo.eps_clip_high}"
    if algo.eps_clip_c is not None and not algo.eps_clip_c > 1:
        yield f"--eps-clip-c (dual clip) must be > 1, got {algo.eps_clip_c}"
    if algo.eps_clip_c is not None and algo.advantage_estimator == "cispo":
        yield "--eps-clip-c does not apply to --advantage-estimator cispo (its IS weight is already bounded)"
    yield from _importance_sampling(config)
    yield from _kl(config)
    yield from _estimator(config)
    yield from _loss_type(config)


# The token-level estimators that read --gamma (ppo also --lambd and the critic settings) and no group statistics;
# reinforce_plus_plus_baseline, token-level too, centres each reward on its group's mean and has no discount.
_DISCOUNTED = ("reinforce_plus_plus", "ppo")


def _kl(config: Config) -> Iterator[str]:
    algo = config.algorithm
    if algo.ref_update_interval is not None and algo.ref_update_interval < 1:
        yield f"--ref-update-interval must be >= 1, got {algo.ref_update_interval}"
    elif algo.ref_update_interval is not None and not algo.needs_reference:
        yield ("--ref-update-interval has no effect without --use-kl-loss or --kl-coef (no reference model is "
               "loaded)")
    if algo.kl_loss_coef < 0:
        yield f"--kl-loss-coef must be >= 0, got {algo.kl_loss_coef}"
    # --use-kl-loss with --kl-loss-coef 0 is slime's way to log the KL (train/kl_loss) without training on it.
    elif not algo.use_kl_loss and algo.kl_loss_coef > 0:
        yield f"--kl-loss-coef {algo.kl_loss_coef} has no effect without --use-kl-loss"
    if not algo.needs_reference and algo.kl_loss_type != "k1":  # k1 is the default: any other value was asked for
        yield f"--kl-loss-type {algo.kl_loss_type} has no effect without --use-kl-loss or --kl-coef"
    if algo.kl_coef < 0:
        yield f"--kl-coef must be >= 0, got {algo.kl_coef}"
    elif algo.kl_coef > 0 and algo.loss_type == "sft_loss":
        yield "--kl-coef (a reward penalty) has no effect with --loss-type sft_loss, which uses no rewards"
    elif (algo.kl_coef > 0 and config.rollout.n_samples_per_prompt == 1 and not algo.disable_rewards_normalization
          and algo.advantage_estimator not in TOKEN_LEVEL_ESTIMATORS):
        yield (f"--kl-coef has no effect with --advantage-estimator {algo.advantage_estimator} and "
               "--n-samples-per-prompt 1: a group of one sample always has advantage 0")


def _estimator(config: Config) -> Iterator[str]:
    algo, train = config.algorithm, config.train
    estimator = algo.advantage_estimator
    for flag, value in (("--gamma", algo.gamma), ("--lambd", algo.lambd)):
        if not 0 <= value <= 1:
            yield f"{flag} must be in [0, 1], got {value}"
    if algo.gamma != 1.0 and estimator not in _DISCOUNTED:
        yield (f"--gamma {algo.gamma} has no effect with --advantage-estimator {estimator} "
               "(only reinforce_plus_plus and ppo discount)")
    if not algo.value_clip > 0:
        yield f"--value-clip must be > 0, got {algo.value_clip}"
    if algo.num_critic_only_steps < 0:
        yield f"--num-critic-only-steps must be >= 0, got {algo.num_critic_only_steps}"
    if train.critic_lr is not None and not train.critic_lr >= 0:
        yield f"--critic-lr must be >= 0, got {train.critic_lr}"
    if estimator != "ppo":
        given = [flag for flag, on in (
            ("--lambd", algo.lambd != 1.0), ("--value-clip", algo.value_clip != 0.2),
            ("--num-critic-only-steps", algo.num_critic_only_steps > 0), ("--critic-load", train.critic_load),
            ("--critic-lr", train.critic_lr is not None)) if on]
        for flag in given:
            yield f"{flag} has no effect with --advantage-estimator {estimator}: only ppo trains a critic"
    elif algo.loss_type == "sft_loss":
        yield "--advantage-estimator ppo trains a critic for RL; it has no effect with --loss-type sft_loss"
    if algo.disable_rewards_normalization and estimator in _DISCOUNTED:
        yield (f"--disable-rewards-normalization has no effect with --advantage-estimator {estimator}: "
               "only the group estimators normalise rewards")
    if algo.disable_grpo_std_normalization and estimator not in GRPO_STD_ESTIMATORS:
        yield (f"--disable-grpo-std-normalization has no effect with --advantage-estimator {estimator}: only "
               f"{', '.join(GRPO_STD_ESTIMATORS[:-1])} and {GRPO_STD_ESTIMATORS[-1]} divide by the group's std")
    if algo.disable_rewards_normalization and algo.disable_grpo_std_normalization:
        yield ("--disable-grpo-std-normalization has no effect with --disable-rewards-normalization "
               "(no group statistics are used at all)")


def _loss_type(config: Config) -> Iterator[str]:
    algo = config.algorithm
    if algo.loss_type == "custom_loss" and not algo.custom_loss_function_path:
        yield "--loss-type custom_loss needs --custom-loss-function-path (the loss function to call)"
    if algo.custom_loss_function_path and algo.loss_type != "custom_loss":
        yield (f"--custom-loss-function-path has no effect with --loss-type {algo.loss_type}: "
               "set --loss-type custom_loss")
    if algo.loss_type == "custom_loss" and algo.use_tis:
        yield ("--use-tis has no effect with --loss-type custom_loss: the TIS weight multiplies the built-in policy "
               "loss (the custom function gets the old and rollout logprobs and can weigh them itself)")


def _importance_sampling(config: Config) -> Iterator[str]:
    algo = config.algorithm
    if algo.tis_clip_low < 0:
        yield f"--tis-clip-low must be >= 0, got {algo.tis_clip_low}"
    if not algo.tis_clip > algo.tis_clip_low:
        yield f"--tis-clip {algo.tis_clip} must be > --tis-clip-low {algo.tis_clip_low}"
    if algo.tis_mode != "token" and not algo.use_tis:
        yield f"--tis-mode {algo.tis_mode} has no effect without --use-tis"
    if algo.use_tis and algo.use_rollout_logprobs:
        yield ("--use-tis with --use-rollout-logprobs: the old logprobs would be the rollout ones and the TIS "
               "weight always 1; drop one")
    if algo.loss_type == "sft_loss":
        for flag, on in (("--use-tis", algo.use_tis), ("--use-rollout-logprobs", algo.use_rollout_logprobs),
                         ("--normalize-advantages", algo.normalize_advantages)):
            if on:
                yield f"{flag} has no effect with --loss-type sft_loss"


def _reward(config: Config) -> Iterator[str]:
    reward = config.reward
    if reward.rm_type is not None and reward.custom_rm_path is not None:
        yield "--rm-type and --custom-rm-path are mutually exclusive: give one"
    if reward.rm_type is not None and reward.rm_type not in BUILTIN_REWARDS:
        yield f"--rm-type must be one of {', '.join(BUILTIN_REWARDS)}, got {reward.rm_type!r}"
    max_len = config.rollout.rollout_max_response_len
    if reward.overlong_buffer_len is not None and not 0 < reward.overlong_buffer_len < max_len:
        yield (f"--overlong-buffer-len must be in (0, --rollout-max-response-len {max_len}), "
               f"got {reward.overlong_buffer_len}")
    if not reward.overlong_penalty_factor >= 0:
        yield f"--overlong-penalty-factor must be >= 0, got {reward.overlong_penalty_factor}"
    if reward.group_rm and reward.custom_rm_path is None:
        yield "--group-rm needs --custom-rm-path (the group reward function)"
    if reward.rm_type == "remote_rm" and not reward.rm_url:
        yield "--rm-type remote_rm needs --rm-url (the reward service's URL)"
    if reward.rm_url and reward.rm_type is not None and reward.rm_type != "remote_rm":
        yield f"--rm-url has no effect with --rm-type {reward.rm_type} (only remote_rm posts to it)"
    if not reward.reward_timeout >= 0:
        yield f"--reward-timeout must be >= 0 (0: no limit), got {reward.reward_timeout}"
    if not reward.rm_timeout > 0:
        yield f"--rm-timeout must be > 0, got {reward.rm_timeout}"
    if reward.rm_max_retries < 0:
        yield f"--rm-max-retries must be >= 0, got {reward.rm_max_retries}"
    if reward.rm_max_connections < 1:
        yield f"--rm-max-connections must be >= 1, got {reward.rm_max_connections}"


def _hooks(config: Config) -> Iterator[str]:
    """Plug-in flags that contradict each other or have nothing to act on (loading is checked at start-up)."""
    rollout, algo = config.rollout, config.algorithm
    if not 0 <= rollout.max_failed_sample_ratio <= 1:
        yield f"--max-failed-sample-ratio must be in [0, 1], got {rollout.max_failed_sample_ratio}"
    if rollout.max_turns < 1:
        yield f"--max-turns must be >= 1, got {rollout.max_turns}"
    elif rollout.max_turns != DEFAULT_MAX_TURNS and not (rollout.tools or rollout.custom_generate_function_path):
        yield "--max-turns has no effect without --tools (or a --custom-generate-function-path that reads it)"
    if rollout.tools and not config.data.apply_chat_template:
        yield "--tools needs --apply-chat-template: the tools are described to the model by the chat template"
    if rollout.agent_function_path and (rollout.tools or rollout.custom_generate_function_path):
        other = "--tools" if rollout.tools else "--custom-generate-function-path"
        yield (f"--agent-function-path and {other} both choose how samples are generated: give one (an agent "
               "passes its tools in its own chat requests)")
    if rollout.rollout_function_path and rollout.dynamic_sampling:
        yield ("--rollout-function-path replaces the whole rollout step, so --over-sampling-batch-size and "
               "--dynamic-sampling-filter-path would have no effect; drop them or apply them in the function")
    if algo.custom_advantage_function_path and algo.advantage_estimator == "ppo":
        yield ("--custom-advantage-function-path cannot replace --advantage-estimator ppo, whose critic needs GAE "
               "returns; choose a group estimator")
    if algo.custom_advantage_function_path and algo.loss_type == "sft_loss":
        yield "--custom-advantage-function-path has no effect with --loss-type sft_loss (no advantages are used)"


def _train(config: Config) -> Iterator[str]:
    train = config.train
    if not train.lr >= 0:
        yield f"--lr must be >= 0, got {train.lr}"
    if not train.clip_grad >= 0:
        yield f"--clip-grad must be >= 0 (0: off), got {train.clip_grad}"
    if train.lr_warmup_iters < 0:
        yield f"--lr-warmup-iters must be >= 0, got {train.lr_warmup_iters}"
    if train.max_tokens_per_gpu is not None and not train.use_dynamic_batch_size:
        yield "--max-tokens-per-gpu has no effect with --no-use-dynamic-batch-size"
    if train.log_probs_chunk_size is not None and train.log_probs_chunk_size < 1:
        yield f"--log-probs-chunk-size must be >= 1, got {train.log_probs_chunk_size}"
    if train.recompute_num_layers < 1:
        yield f"--recompute-num-layers must be >= 1, got {train.recompute_num_layers}"
    if train.max_tokens_per_gpu is not None and train.max_tokens_per_gpu < 2:
        yield f"--max-tokens-per-gpu must be >= 2, got {train.max_tokens_per_gpu}"
    if train.max_consecutive_nonfinite_steps < 0:
        yield ("--max-consecutive-nonfinite-steps must be >= 0 (0: never stop), got "
               f"{train.max_consecutive_nonfinite_steps}")


def _eval_and_checkpoint(config: Config) -> Iterator[str]:
    ev, ckpt = config.eval, config.checkpoint
    if len(ev.eval_prompt_data) % 2:
        yield f"--eval-prompt-data takes NAME PATH pairs, got {len(ev.eval_prompt_data)} values"
    if len(ev.eval_sft_data) % 2:
        yield f"--eval-sft-data takes NAME PATH pairs, got {len(ev.eval_sft_data)} values"
    if not math.isfinite(ev.eval_accuracy_threshold):
        yield f"--eval-accuracy-threshold must be a finite number, got {ev.eval_accuracy_threshold}"
    if ev.eval_interval is not None and ev.eval_interval <= 0:
        yield f"--eval-interval must be > 0, got {ev.eval_interval}"
    if ev.n_samples_per_eval_prompt < 1:
        yield f"--n-samples-per-eval-prompt must be >= 1, got {ev.n_samples_per_eval_prompt}"
    if ckpt.save_interval is not None and ckpt.save is None and ckpt.save_hf is None:
        yield "--save-interval needs --save (the directory to save to) or --save-hf"
    if ckpt.save_interval is not None and ckpt.save_interval <= 0:
        yield f"--save-interval must be > 0, got {ckpt.save_interval}"
    if ckpt.keep_checkpoints is not None and ckpt.keep_checkpoints < 1:
        yield f"--keep-checkpoints must be >= 1, got {ckpt.keep_checkpoints}"
    elif ckpt.keep_checkpoints is not None and ckpt.save is None:
        yield "--keep-checkpoints has no effect without --save"
    if not ckpt.save_optim and ckpt.save is None:
        yield "--no-save-optim has no effect without --save"
    yield from _path_template("--save-hf", ckpt.save_hf)


def _path_template(flag: str, template: str | None) -> Iterator[str]:
    """A path with ``{rollout_id}`` placeholders: any other brace field would fail only at the first save."""
    if template is None:
        return
    try:
        template.format(rollout_id=0)
    except (KeyError, IndexError, ValueError) as error:
        yield (f"{flag} {template!r}: only {{rollout_id}} may appear in braces ({type(error).__name__}: {error}); "
               "write a literal brace as {{ or }}")


def _logging(config: Config) -> Iterator[str]:
    logging = config.logging
    if logging.num_logged_samples < 0:
        yield f"--num-logged-samples must be >= 0 (0: none), got {logging.num_logged_samples}"
    if logging.tensorboard_dir is not None and not logging.use_tensorboard:
        yield "--tensorboard-dir has no effect without --use-tensorboard"
    if not logging.use_wandb:
        for flag, value in (("--wandb-project", logging.wandb_project), ("--wandb-group", logging.wandb_group),
                            ("--wandb-mode", logging.wandb_mode)):
            if value is not None:
                yield f"{flag} has no effect without --use-wandb"


def _debug(config: Config) -> Iterator[str]:
    debug, ckpt = config.debug, config.checkpoint
    yield from _path_template("--save-debug-rollout-data", debug.save_debug_rollout_data)
    yield from _path_template("--load-debug-rollout-data", debug.load_debug_rollout_data)
    template = debug.save_debug_rollout_data
    if template is not None and "{rollout_id}" not in template and config.rollout.num_rollout != 1:
        yield (f"--save-debug-rollout-data {template!r} has no {{rollout_id}}: every rollout would overwrite the "
               "same file")
    if debug.debug_rollout_only and debug.debug_train_only:
        yield "--debug-rollout-only and --debug-train-only are mutually exclusive: give one"
    if debug.debug_train_only and debug.load_debug_rollout_data is None and not config.rollout.sft_from_data:
        # slime's SFT scripts pass --debug-train-only to start no engine; SFT from data starts none anyway
        yield ("--debug-train-only needs --load-debug-rollout-data (the saved rollouts to train on), or "
               "--rollout-function-path sft (responses from the data)")
    if debug.debug_train_only and config.eval.eval_prompt_data:
        hint = (": drop --debug-train-only (an SFT run from data starts an engine for its eval sets alone)"
                if config.rollout.sft_from_data else "")
        yield f"--eval-prompt-data needs an engine, which --debug-train-only does not start{hint}"
    if debug.debug_rollout_only:
        if debug.load_debug_rollout_data is not None:
            yield "--load-debug-rollout-data replays rollouts into training, which --debug-rollout-only skips"
        for flag, value in (("--save", ckpt.save), ("--load", ckpt.load), ("--save-hf", ckpt.save_hf)):
            if value is not None:
                yield f"{flag} has no effect with --debug-rollout-only (no trainer is built)"


def _engine(config: Config) -> Iterator[str]:
    engine = config.engine
    if not 0 < engine.mem_fraction_static <= 1:
        yield f"--sglang-mem-fraction-static must be in (0, 1], got {engine.mem_fraction_static}"
    if engine.max_running_requests < 1:
        yield f"--sglang-max-running-requests must be >= 1, got {engine.max_running_requests}"
    if engine.page_size < 1 or engine.page_size & (engine.page_size - 1):
        yield f"--sglang-page-size must be a power of two, got {engine.page_size}"
    for flag, value in (("--sglang-max-total-tokens", engine.max_total_tokens),
                        ("--sglang-context-length", engine.context_length),
                        ("--sglang-chunked-prefill-size", engine.chunked_prefill_size),
                        ("--sglang-cuda-graph-max-bs", engine.cuda_graph_max_bs),
                        ("--sglang-max-prompts-per-request", engine.max_prompts_per_request),
                        ("--sglang-max-prompt-tokens", engine.max_prompt_tokens)):
        if value is not None and value < 1:
            yield f"{flag} must be >= 1, got {value}"
    if engine.max_top_logprobs < 0:
        yield f"--sglang-max-top-logprobs must be >= 0, got {engine.max_top_logprobs}"
    if engine.max_token_ids_logprob < 0:
        yield f"--sglang-max-token-ids-logprob must be >= 0, got {engine.max_token_ids_logprob}"
    if engine.max_queued_requests < 0:
        yield f"--sglang-max-queued-requests must be >= 0, got {engine.max_queued_requests}"
    if not engine.max_request_body_mb > 0:
        yield f"--sglang-max-request-body-mb must be > 0, got {engine.max_request_body_mb}"
    for flag, key in (("--sglang-api-key", engine.api_key), ("--sglang-admin-api-key", engine.admin_api_key)):
        if key is not None and (not key.strip() or any(c.isspace() or not c.isprintable() for c in key)):
            yield f"{flag} must be a non-empty key without spaces (it travels as 'Authorization: Bearer KEY')"


def _training(config: Config) -> Iterator[str]:
    """What a training run needs on top of a consistent config: a model, prompts and a reward."""
    if config.model.hf_checkpoint is None:
        yield "--hf-checkpoint is required for training"
    if config.data.prompt_data is None and config.data.data_source_path is None:
        yield "--prompt-data is required for training (or a --data-source-path)"
    if config.rollout.rollout_batch_size is None:
        yield "--rollout-batch-size is required for training"
    no_reward = config.reward.rm_type is None and config.reward.custom_rm_path is None
    rewards_elsewhere = config.rollout.rollout_function_path or config.rollout.agent_function_path
    if config.algorithm.loss_type != "sft_loss" and no_reward and not rewards_elsewhere:
        yield f"--loss-type {config.algorithm.loss_type} needs a reward: set --rm-type or --custom-rm-path"
    algo = config.algorithm
    group_of_one = config.rollout.n_samples_per_prompt == 1 and not algo.disable_rewards_normalization
    fix = "use --n-samples-per-prompt >= 2, or reinforce_plus_plus / ppo, or --disable-rewards-normalization"
    if group_of_one and algo.advantage_estimator not in _DISCOUNTED and algo.loss_type != "sft_loss":
        if algo.advantage_estimator in TOKEN_LEVEL_ESTIMATORS and algo.kl_coef > 0:
            yield (f"--advantage-estimator {algo.advantage_estimator} with --n-samples-per-prompt 1: a reward minus "
                   "the mean of its group of one is 0, so only the --kl-coef penalty trains the policy and the "
                   f"reward never does; {fix}")
        else:
            yield (f"--advantage-estimator {algo.advantage_estimator} with --n-samples-per-prompt 1: a group "
                   "estimator compares the samples of a prompt, so a group of one has advantage 0 and the policy "
                   f"gets no gradient; {fix}")
    rm_type = config.reward.rm_type
    if rm_type is not None and rm_type not in LABEL_FREE_REWARDS and config.data.label_key is None:
        yield f"--rm-type {rm_type} compares responses with a label: set --label-key"


def _devices(config: Config) -> Iterator[str]:
    """A device this machine lacks fails here, not deep in a model load. Ray actors may run on other nodes, so a
    distributed run's devices are theirs to check."""
    if config.cluster.distributed:
        return
    for flag, name in (("--train-device", config.train.train_device), ("--sglang-device", config.engine.device)):
        if name == "auto":
            continue
        import torch  # only when a device is named: validating a config stays cheap otherwise

        try:
            device = torch.device(name)
        except RuntimeError:
            yield f"{flag} {name!r} is not a device: use auto, cpu or cuda[:N]"
            continue
        if device.type != "cuda":
            continue
        if not torch.cuda.is_available():
            yield (f"{flag} {name}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                   "use auto or cpu")
        elif device.index is not None and device.index >= torch.cuda.device_count():
            yield f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"


def _cluster(config: Config) -> Iterator[str]:
    cluster = config.cluster
    for flag, value in (("--actor-num-nodes", cluster.actor_num_nodes),
                        ("--actor-num-gpus-per-node", cluster.actor_num_gpus_per_node),
                        ("--rollout-num-gpus-per-engine", cluster.rollout_num_gpus_per_engine)):
        if value < 1:
            yield f"{flag} must be >= 1, got {value}"
    if cluster.rollout_num_gpus_per_engine > 1:
        yield (f"--rollout-num-gpus-per-engine {cluster.rollout_num_gpus_per_engine}: sluice's engine runs on one "
               "device; use 1 (more engines spread the rollout pool)")
    if cluster.rollout_num_gpus is not None and cluster.rollout_num_gpus < 1:
        yield f"--rollout-num-gpus must be >= 1, got {cluster.rollout_num_gpus}"
    elif cluster.rollout_num_gpus_per_engine >= 1 and cluster.rollout_slots % cluster.rollout_num_gpus_per_engine:
        yield (f"--rollout-num-gpus {cluster.rollout_slots} must be a multiple of --rollout-num-gpus-per-engine "
               f"{cluster.rollout_num_gpus_per_engine}")
    offloads = cluster.offload or cluster.offload_train or cluster.offload_rollout
    if offloads and not cluster.colocate and cluster.distributed:
        yield ("--offload/--offload-train/--offload-rollout free memory for the other pool on shared devices: with "
               "separate pools they need --colocate")
    if offloads and config.sync.async_train:
        yield "--offload/--offload-train/--offload-rollout take turns on the devices; --async runs both at once"
    if config.train.optimizer_cpu_offload and cluster.train_world_size > 1 and config.train.train_device != "cpu":
        yield (f"--optimizer-cpu-offload keeps whole float32 masters in host memory, but a train pool of "
               f"{cluster.train_world_size} GPUs shards its weights with FSDP: drop the flag (FSDP already divides "
               "the optimizer state by the number of GPUs), or train on one GPU")
    if cluster.orchestrator == "local" and (cluster.train_world_size > 1 or cluster.num_engines > 1):
        yield (f"--orchestrator local runs one trainer and one engine in one process; the pool flags ask for "
               f"{cluster.train_world_size} trainers and {cluster.num_engines} engines (use --orchestrator ray)")


def _sync(config: Config) -> Iterator[str]:
    sync, cluster = config.sync, config.cluster
    if cluster.distributed and sync.weight_sync_method == "in_process":
        yield ("--weight-sync-method in_process copies weights inside one process; with Ray the engines are their "
               "own processes: use broadcast or disk")
    if not cluster.distributed and sync.weight_sync_method in ("broadcast", "ipc"):
        yield (f"--weight-sync-method {sync.weight_sync_method} sends weights to engine processes; this run keeps its "
               "engine in this process (use in_process or disk, or place the pools with Ray)")
    if sync.weight_sync_dir is not None and sync.weight_sync_method != "disk":
        yield "--weight-sync-dir is where --weight-sync-method disk writes: add that method or drop the flag"
    if sync.update_weights_interval < 1:
        yield f"--update-weights-interval must be >= 1, got {sync.update_weights_interval}"
    if sync.update_weight_buffer_size < 1:
        yield f"--update-weight-buffer-size must be >= 1 byte, got {sync.update_weight_buffer_size}"
    if not sync.update_weights_timeout > 0:
        yield f"--update-weights-timeout must be > 0 seconds, got {sync.update_weights_timeout}"
    rollout = config.rollout
    if (rollout.partial_rollout or sync.update_weights_interval > 1) and not sync.async_train:
        flag = "--partial-rollout" if rollout.partial_rollout else "--update-weights-interval"
        yield f"{flag} applies to the asynchronous loop: add --async"
    if rollout.mask_offpolicy_in_partial_rollout and not rollout.partial_rollout:
        yield "--mask-offpolicy-in-partial-rollout needs --partial-rollout"
    if sync.async_train:
        yield from _async_loop(config)


def _async_loop(config: Config) -> Iterator[str]:
    rollout, sync, debug = config.rollout, config.sync, config.debug
    interval = sync.update_weights_interval
    if rollout.max_staleness is not None and 0 <= rollout.max_staleness < interval:
        yield (f"--max-staleness {rollout.max_staleness} is below --update-weights-interval {interval}: with --async "
               f"the engines generate with weights up to {interval} version(s) behind the trainer, so every group "
               "would be regenerated; raise --max-staleness or drop --async")
    for flag, value in (("--rollout-function-path", rollout.rollout_function_path),
                        ("--buffer-filter-path", rollout.buffer_filter_path)):
        if value:
            yield (f"{flag} works on a whole step's rollout; --async streams groups one at a time (use a generate "
                   "function, a reward function or --dynamic-sampling-filter-path)")
    if rollout.over_sampling_batch_size is not None:
        yield ("--over-sampling-batch-size sets the round size of the sync loop's dynamic sampling; with --async "
               "groups stream until enough pass --dynamic-sampling-filter-path: drop it")
    for flag, value in (("--debug-rollout-only", debug.debug_rollout_only),
                        ("--debug-train-only", debug.debug_train_only),
                        ("--load-debug-rollout-data", debug.load_debug_rollout_data)):
        if value:
            yield f"{flag} runs the synchronous loop: drop --async"


_CHECKS: tuple[Callable[[Config], Iterator[str]], ...] = (
    _batches, _rollout, _sampling, _algorithm, _reward, _hooks, _train, _eval_and_checkpoint, _logging, _debug,
    _engine, _devices, _cluster, _sync, slime_compat_problems, sft_problems)


def validate(config: Config, *, for_training: bool = True) -> None:
    """Raises ConfigError listing every problem, each naming its flag(s).

    ``for_training=False`` (e.g. evaluation only) skips the requirements of a training run:
    --hf-checkpoint, --prompt-data, --rollout-batch-size and a reward for policy_loss.
    """
    checks = _CHECKS + ((_training,) if for_training else ())
    problems = [message for check in checks for message in check(config)]
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
