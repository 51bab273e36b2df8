"""The config tree: one dataclass per component, each field documented once, here.

Every field becomes a command-line flag named after it (``rollout_batch_size`` -> ``--rollout-batch-size``),
which keeps slime's flag names for the same features. ``meta(...)`` holds the help text and, where needed,
the choices or a flag spelling that differs from the field name. ``EngineConfig`` fields are reached as
``--sglang-<name>`` (SGLang's server flags, passed through to our engine); that section is declared in
``sluice/engine/settings.py``, so the engine needs nothing from this package, and is part of this tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sluice.config.megatron import MegatronConfig
from sluice.engine.settings import EngineConfig

# Built-in reward functions, selectable with --rm-type; the reward registry implements exactly these.
BUILTIN_REWARDS: tuple[str, ...] = ("exact", "math", "f1", "deepscaler", "boxed_exact", "boxed_math", "boxed_f1",
                                    "remote_rm", "random")
# Built-in rewards that do not compare with a label (--label-key is optional for them).
LABEL_FREE_REWARDS: tuple[str, ...] = ("remote_rm", "random")
DEFAULT_MAX_TURNS = 4
# --advantage-estimator families, named once for the trainer (trainer/batch_advantages.py, batching.py) and the
# config checks. The group std divides these estimators' advantages (--disable-grpo-std-normalization drops it):
GRPO_STD_ESTIMATORS: tuple[str, ...] = ("grpo", "gspo", "cispo")
# These give every trained token its own advantage (the others one per sample, broadcast), so a per-token
# -kl_coef * KL_t reaches the advantage even where the reward's group statistics make it 0:
TOKEN_LEVEL_ESTIMATORS: tuple[str, ...] = ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo")
# The built-in SFT rollout function (rollout/sft.py): trains on responses read from the data, no engine runs.
# --rollout-function-path accepts it by this path, by the short name "sft" and by slime's dotted name.
SFT_ROLLOUT_FUNCTION = "sluice.rollout.sft.sft_rollout"
SFT_ROLLOUT_ALIASES: tuple[str, ...] = ("sft", "slime.rollout.sft_rollout.generate_rollout",
                                        "slime.rollout.sft_rollout:generate_rollout")


def meta(help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None, metavar: str | None = None):
    """Field metadata read by the CLI generator."""
    out: dict[str, Any] = {"help": help}
    if choices is not None:
        out["choices"] = choices
    if flag is not None:
        out["flag"] = flag
    if metavar is not None:
        out["metavar"] = metavar
    return out


@dataclass
class ModelConfig:
    hf_checkpoint: str | None = field(default=None, metadata=meta(
        "Hugging Face checkpoint directory (config.json, safetensors, tokenizer) for the engine, trainer and tokenizer."))
    ref_load: str | None = field(default=None, metadata=meta(
        "Checkpoint of the reference model for KL terms; default: --hf-checkpoint."))


@dataclass
class DataConfig:
    prompt_data: str | None = field(default=None, metadata=meta(
        "Prompt data, optionally sliced as path@[a:b] over all its rows: a .jsonl, .jsonl.gz, .jsonl.zst, "
        ".parquet or .arrow file; a directory (or glob) of such shards, read in name order; or a directory "
        "written by datasets' save_to_disk. Past 50,000 rows it streams: rows are read and tokenized as batches "
        "draw them (docs/data.md)."))
    input_key: str = field(default="input", metadata=meta(
        "Key of the prompt (text or chat messages) in each row; a dotted path reaches into nested objects "
        "(as do the other key flags)."))
    label_key: str | None = field(default=None, metadata=meta(
        "Key of the reference answer in each row, e.g. reward_model.ground_truth."))
    response_key: str | None = field(default=None, metadata=meta(
        "Key of the response to train on, for SFT from data (--rollout-function-path sft): a string (the "
        "assistant's reply to the prompt) or a list of chat messages continuing the conversation (the loss "
        "covers the assistant turns only). Unset (or the same key as --input-key): the --input-key value is a "
        "whole conversation, trained on its assistant turns from the first on (slime's SFT layout)."))
    metadata_key: str = field(default="metadata", metadata=meta("Key of a per-row dict passed to reward functions."))
    data_source_key: str | None = field(default="data_source", metadata=meta(
        "Key of the row's data source (verl's column); its value goes to reward functions as "
        "sample.metadata['data_source'], for rewards that dispatch by source. Rows without it get none."))
    apply_chat_template: bool = field(default=False, metadata=meta(
        "Render each prompt with the tokenizer's chat template (a text prompt becomes one user message)."))
    apply_chat_template_kwargs: dict[str, Any] = field(default_factory=dict, metadata=meta(
        "Extra keyword arguments for the chat template, as JSON (e.g. '{\"enable_thinking\": false}')."))
    rollout_shuffle: bool = field(default=False, metadata=meta("Shuffle prompts each epoch (seeded by --rollout-seed)."))
    rollout_seed: int = field(default=42, metadata=meta(
        "Seed of the prompt shuffle and of sampling: every rollout and eval request carries a seed derived from it "
        "and its sample (docs/reproducibility.md)."))
    rollout_max_prompt_len: int | None = field(default=None, metadata=meta(
        "Drop prompts longer than this many tokens, with a warning naming the count (a streamed --prompt-data "
        "skips them as batches draw them). Unset, a prompt longer than the model's context minus "
        "--rollout-max-response-len (--eval-max-response-len for eval data) is an error naming its file and line."))
    allow_lossy_prompts: bool = field(default=False, metadata=meta(
        "Load prompts with characters the tokenizer cannot represent (it drops them or maps them to its unknown "
        "token), with a warning naming the count, instead of an error naming the row and the characters."))
    data_source_path: str | None = field(default=None, metadata=meta(
        "Replaces the prompt source: a factory fn(prompts: list[Sample], seed: int) returning an object with "
        "next_batch(n) -> list[Sample] (state_dict()/load_state_dict() for resume), or slime's data source class "
        "Cls(args) with get_samples(n); prompts is --prompt-data converted whole, never streamed. See "
        "docs/customization.md."))


@dataclass
class RolloutConfig:
    rollout_batch_size: int | None = field(default=None, metadata=meta("Prompts per rollout step (required)."))
    n_samples_per_prompt: int = field(default=1, metadata=meta("Responses sampled per prompt (the GRPO group size)."))
    rollout_max_response_len: int = field(default=1024, metadata=meta("Most new tokens per response."))
    rollout_temperature: float = field(default=1.0, metadata=meta(
        "Sampling temperature; the trainer divides its logits by the same value."))
    rollout_top_p: float = field(default=1.0, metadata=meta("Nucleus sampling mass (1.0: off)."))
    rollout_top_k: int = field(default=-1, metadata=meta("Sample among the k most likely tokens (-1: off)."))
    rollout_stop: list[str] = field(default_factory=list, metadata=meta("Stop strings, trimmed from the response."))
    rollout_stop_token_ids: list[int] = field(default_factory=list, metadata=meta("Stop token ids besides EOS."))
    num_rollout: int | None = field(default=None, metadata=meta(
        "Rollout steps to run; default: enough for --num-epoch passes over the prompts."))
    num_epoch: int = field(default=1, metadata=meta("Passes over the prompt data when --num-rollout is not set."))
    rollout_max_concurrency: int = field(default=256, metadata=meta(
        "Most generate requests in flight at once from the rollout manager."))
    over_sampling_batch_size: int | None = field(default=None, metadata=meta(
        "Prompts per generation round of dynamic sampling (DAPO); rounds repeat until --rollout-batch-size "
        "groups pass --dynamic-sampling-filter-path (at most 8 rounds; extra kept groups are dropped). "
        "Default: --rollout-batch-size."))
    dynamic_sampling_filter_path: str | None = field(default=None, metadata=meta(
        "Dotted path of a group filter f(group_samples) -> bool (or slime's f(args, samples) -> bool | .keep); "
        "True keeps the group. Built-in: sluice.rollout.filters.drop_uniform_rewards."))

    rollout_function_path: str | None = field(default=None, metadata=meta(
        "Replaces the rollout of a step: async fn(request: sluice.rollout.RolloutRequest) -> list[SampleGroup] "
        "| RolloutOutput, or slime's generate_rollout(args, rollout_id, data_source, evaluation=False). "
        "Built-in: sft (also spelled sluice.rollout.sft.sft_rollout or slime.rollout.sft_rollout.generate_rollout), "
        "supervised training on the responses of --response-key with --loss-type sft_loss; no engine starts."))
    custom_generate_function_path: str | None = field(default=None, metadata=meta(
        "Replaces the generate function: async fn(sample, sampling_params, ctx) -> Sample | list[Sample], or "
        "slime's async fn(args, sample, sampling_params). Built-in: sluice.rollout.multi_turn.generate_with_tools."))
    buffer_filter_path: str | None = field(default=None, metadata=meta(
        "Picks which finished groups of a rollout are trained: fn(groups: list[SampleGroup], num_groups: int) -> "
        "list[SampleGroup], or slime's fn(args, rollout_id, buffer, num_samples). The rest are dropped."))
    tools: list[str] = field(default_factory=list, metadata=meta(
        "Tool functions for multi-turn generation, by path ('pkg.mod:calculator', 'file.py:fn'): plain typed "
        "Python functions whose calls the model writes in the chat template's tool format. Selects the built-in "
        "multi-turn generate function; needs --apply-chat-template.", metavar="PATH"))
    max_turns: int = field(default=DEFAULT_MAX_TURNS, metadata=meta(
        "Most assistant turns per sample in multi-turn generation (--tools)."))
    agent_function_path: str | None = field(default=None, metadata=meta(
        "An agent program run once per sample against the OpenAI-compatible gateway: fn(task: "
        "sluice.rollout.AgentTask) -> float | dict | None (its reward; None: score with the reward function), "
        "sync or async. Its chat completions are recorded token for token and trained."))
    max_staleness: int | None = field(default=None, metadata=meta(
        "Most policy versions a trained group may lag behind the trainer (0: on-policy). The Data Buffer "
        "regenerates an older finished group from its prompt instead of training on it. Default: 0, or "
        "--update-weights-interval with --async (the least the overlap needs)."))
    partial_rollout: bool = field(default=False, metadata=meta(
        "With --async: at a weight update, abort the requests in flight, keep their tokens, and resume them "
        "later (on the new weights) instead of letting them continue across the update."))
    mask_offpolicy_in_partial_rollout: bool = field(default=False, metadata=meta(
        "With --partial-rollout: train only the tokens generated by the newest weights of each sample (the "
        "tokens from before an update get loss mask 0)."))
    max_failed_sample_ratio: float = field(default=0.5, metadata=meta(
        "Stop the run when more than this fraction of a rollout's samples failed (generate or reward raised or "
        "timed out); failed samples below it are dropped from training and logged."))

    @property
    def sft_from_data(self) -> bool:
        """Whether the rollout is the built-in SFT function: responses come from the data, no engine generates."""
        path = self.rollout_function_path
        return path == SFT_ROLLOUT_FUNCTION or path in SFT_ROLLOUT_ALIASES

    @property
    def trainer_temperature(self) -> float:
        """The temperature of the trainer's logprobs: the engines' sampling temperature, so old and new policy
        logprobs match what was sampled; 1 for SFT from data, whose loss is the model's own NLL of the responses
        (--rollout-temperature then only sets how eval sets are sampled)."""
        return 1.0 if self.sft_from_data else self.rollout_temperature

    @property
    def dynamic_sampling(self) -> bool:
        """Whether rollouts go through the round-based sampler (either flag set)."""
        return self.over_sampling_batch_size is not None or self.dynamic_sampling_filter_path is not None


@dataclass
class TrainConfig:
    global_batch_size: int | None = field(default=None, metadata=meta(
        "Samples per optimizer step; default: one step per rollout (rollout batch x samples per prompt)."))
    micro_batch_size: int = field(default=1, metadata=meta(
        "Samples per forward/backward pass; gradients accumulate to the global batch. Does not change the result."))
    optimizer: str = field(default="adam", metadata=meta(
        "Optimizer, Megatron's name: adam is AdamW (decoupled --weight-decay), the only one sluice has."))
    lr: float = field(default=1e-6, metadata=meta("Peak learning rate of AdamW."))
    lr_warmup_iters: int = field(default=0, metadata=meta(
        "Optimizer steps of linear warmup from --lr-warmup-init to --lr (step k of W runs at (k+1)/W of the way)."))
    lr_warmup_fraction: float | None = field(default=None, metadata=meta(
        "Warmup as a fraction of --lr-decay-iters (Megatron's); replaces --lr-warmup-iters."))
    lr_warmup_init: float = field(default=0.0, metadata=meta("Learning rate the warmup starts from."))
    lr_decay_style: str = field(default="constant", metadata=meta(
        "Learning rate after warmup, as Megatron defines it: constant (--lr), or linear / cosine decay from --lr "
        "to --min-lr, reached at step --lr-decay-iters and held after.", choices=("constant", "linear", "cosine")))
    lr_decay_iters: int | None = field(default=None, metadata=meta(
        "Optimizer steps to the end of the decay (warmup included); default: every step of the run, "
        "--num-rollout x samples per rollout / --global-batch-size, when --num-rollout is set."))
    min_lr: float = field(default=0.0, metadata=meta("Learning rate at the end of a linear or cosine decay."))
    weight_decay: float = field(default=0.0, metadata=meta("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=meta("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=meta("AdamW beta2."))
    clip_grad: float = field(default=1.0, metadata=meta("Clip the global gradient norm to this (0: off)."))
    optimizer_cpu_offload: bool = field(default=False, metadata=meta(
        "Keep the float32 master weights and AdamW moments of the actor (and PPO critic) in host memory and run "
        "AdamW there (Megatron's flag): the GPU holds the weights in --train-dtype and float32 gradients, 6 bytes "
        "per parameter in bf16 instead of 16, and each step copies the gradients out and the new weights back. "
        "For a model whose optimizer state does not fit one GPU (7B on 80 GB); one process or a replicated pool, "
        "not with FSDP."))
    seed: int = field(default=1234, metadata=meta("Seed of the trainer (initialisation, dropout)."))
    train_device: str = field(default="auto", metadata=meta(
        "Device of the trainer: auto (cuda if present), cpu or cuda[:N]."))
    train_dtype: str = field(default="float32", metadata=meta(
        "Compute dtype of the trainer. bfloat16: matrix products and activations in bf16 while the weights, "
        "gradients and AdamW moments stay float32 (mixed precision with float32 master weights, as Megatron "
        "trains); float32: everything in float32.", choices=("float32", "bfloat16")))
    train_model_impl: str = field(default="auto", metadata=meta(
        "Model code of the trainer. native: sluice's own decoder (the engine's model definition; packed "
        "variable-length attention, no padding or dense masks); hf: the Hugging Face transformers class; auto: "
        "native for the families it implements (Qwen2/2.5, Qwen3, Llama), hf for the rest.",
        choices=("auto", "native", "hf")))
    use_dynamic_batch_size: bool = field(default=True, metadata=meta(
        "Form micro-batches by token budget (--max-tokens-per-gpu) instead of --micro-batch-size, each packed "
        "into one row (sequences back to back, position ids restarting per sequence, attention kept within "
        "each sequence): no compute on padding. --no-use-dynamic-batch-size pads --micro-batch-size rows "
        "instead. Does not change the result."))
    max_tokens_per_gpu: int | None = field(default=None, metadata=meta(
        "Token budget of one packed micro-batch (a longer sequence goes alone). Default: derived from the free "
        "device memory after the model and optimizer load (GPU), or 16384 (CPU)."))
    log_probs_chunk_size: int | None = field(default=None, metadata=meta(
        "Tokens per chunk of the LM head, log-softmax and entropy (forward and backward) with the native "
        "model: memory O(chunk x vocabulary), never the float32 logits of a whole micro-batch. Default: about "
        "1 GiB of float32 logits per chunk."))
    recompute_granularity: str | None = field(default=None, metadata=meta(
        "Activation checkpointing (native model), Megatron's names: full recomputes whole decoder layers in "
        "the backward pass (least memory); selective recomputes only the core attention. Default: off.",
        choices=("full", "selective")))
    recompute_method: str = field(default="uniform", metadata=meta(
        "With --recompute-granularity full: uniform checkpoints every group of --recompute-num-layers "
        "consecutive layers (storing one input per group); block checkpoints only the first "
        "--recompute-num-layers layers, one by one, and stores the activations of the rest.",
        choices=("uniform", "block")))
    recompute_num_layers: int = field(default=1, metadata=meta(
        "Layers per recomputed group (uniform) or layers recomputed (block); see --recompute-method."))
    critic_load: str | None = field(default=None, metadata=meta(
        "Hugging Face checkpoint to initialise the PPO critic from: a causal LM (its backbone gets a new scalar "
        "head, starting at 0) or a saved critic (*ForTokenClassification, 1 label). Default: --hf-checkpoint."))
    critic_lr: float | None = field(default=None, metadata=meta("Learning rate of the PPO critic; default: --lr."))
    max_consecutive_nonfinite_steps: int = field(default=3, metadata=meta(
        "An optimizer step whose loss or gradient norm is NaN or infinite is skipped (warning; counted in "
        "train/nonfinite_skipped_steps); this many skipped steps in a row stop the run with an error "
        "(0: never stop)."))


@dataclass
class AlgorithmConfig:
    advantage_estimator: str = field(default="grpo", metadata=meta(
        "How rewards become advantages; gspo and cispo use GRPO advantages with their own policy loss; "
        "reinforce_plus_plus_baseline is slime's (group-centred rewards on the tokens, minus --kl-coef x KL, whitened "
        "over the batch's tokens), reinforce_plus_plus_baseline_sample its sample-level form (docs/algorithms.md).",
        choices=("grpo", "dr_grpo", "gspo", "cispo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                 "reinforce_plus_plus_baseline_sample", "ppo")))
    loss_type: str = field(default="policy_loss", metadata=meta(
        "policy_loss (RL), sft_loss (supervised, on the response tokens) or custom_loss (the function of "
        "--custom-loss-function-path replaces the policy loss).", choices=("policy_loss", "sft_loss", "custom_loss")))
    custom_advantage_function_path: str | None = field(default=None, metadata=meta(
        "Replaces the advantage estimator: fn(inputs: sluice.trainer.custom_advantage.AdvantageInputs) -> "
        "Tensor [B, T-1], or slime's fn(args, rollout_data) setting rollout_data['advantages']."))
    custom_loss_function_path: str | None = field(default=None, metadata=meta(
        "With --loss-type custom_loss: 'pkg.module.fn', 'pkg.module:fn' or 'path/to/file.py:fn', a function "
        "fn(inputs: sluice.trainer.custom_loss.LossInputs) -> (loss, metrics); see docs/algorithms.md."))
    kl_coef: float = field(default=0.0, metadata=meta(
        "KL penalty in the reward: -kl_coef * KL(policy || reference) per token (estimator --kl-loss-type) for "
        "reinforce_plus_plus and ppo; summed over the response and subtracted from the reward for the group "
        "estimators."))
    gamma: float = field(default=1.0, metadata=meta(
        "Discount of the token-level returns (reinforce_plus_plus, ppo)."))
    lambd: float = field(default=1.0, metadata=meta("GAE lambda (ppo)."))
    value_clip: float = field(default=0.2, metadata=meta(
        "Clip of the critic's value change around its rollout-time value, in reward units (ppo)."))
    num_critic_only_steps: int = field(default=0, metadata=meta(
        "The first N rollout steps train only the critic; the policy stays fixed (ppo)."))
    eps_clip: float = field(default=0.2, metadata=meta("PPO clip range below 1 (and above, unless --eps-clip-high)."))
    eps_clip_high: float | None = field(default=None, metadata=meta("PPO clip range above 1 (clip-higher)."))
    eps_clip_c: float | None = field(default=None, metadata=meta(
        "Dual clip (> 1): cap the loss of negative-advantage tokens at -A * c (not with cispo)."))
    calculate_per_token_loss: bool = field(default=False, metadata=meta(
        "slime's flag for averaging the loss over every token of the step: sets --loss-agg-mode token_mean "
        "(already the default)."))
    loss_agg_mode: str = field(default="token_mean", metadata=meta(
        "How per-token losses become the step loss; counts are over the whole optimizer step.",
        choices=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")))
    normalize_advantages: bool = field(default=False, metadata=meta(
        "Whiten token advantages over all trained tokens of the rollout batch, before optimizer steps."))
    use_rollout_logprobs: bool = field(default=False, metadata=meta(
        "Use the engine's logprobs as the old (behaviour) logprobs instead of recomputing them."))
    use_tis: bool = field(default=False, metadata=meta(
        "Truncated importance sampling: weight each token's policy loss by "
        "clamp(exp(old_logprob_trainer - rollout_logprob), --tis-clip-low, --tis-clip), correcting the "
        "engine-vs-trainer logprob mismatch (variant: --tis-mode)."))
    tis_mode: str = field(default="token", metadata=meta(
        "Importance weight of --use-tis: token (per-token TIS), sequence (exp of the summed log-ratio), "
        "geometric (exp of the mean log-ratio), icepop (drop tokens whose ratio is outside the bounds).",
        choices=("token", "sequence", "geometric", "icepop")))
    tis_clip: float = field(default=2.0, metadata=meta("Upper bound of the TIS weight (icepop: of a kept ratio)."))
    tis_clip_low: float = field(default=0.0, metadata=meta("Lower bound of the TIS weight (icepop: of a kept ratio)."))
    use_kl_loss: bool = field(default=False, metadata=meta("Add a KL(policy || reference) term to the loss."))
    kl_loss_coef: float = field(default=0.0, metadata=meta("Weight of the KL loss term."))
    kl_loss_type: str = field(default="k1", metadata=meta(
        "KL estimator of the loss term and of the --kl-coef reward penalty; low_var_kl is k3 clamped to [-10, 10].",
        choices=("k1", "k2", "k3", "low_var_kl")))
    entropy_coef: float = field(default=0.0, metadata=meta("Weight of the entropy bonus (subtracted from the loss)."))
    ref_update_interval: int | None = field(default=None, metadata=meta(
        "Copy the actor's weights into the KL reference every N rollout steps (default: a fixed reference)."))
    disable_grpo_std_normalization: bool = field(default=False, metadata=meta(
        "Do not divide GRPO advantages by the group's reward std (Dr.GRPO)."))
    disable_rewards_normalization: bool = field(default=False, metadata=meta(
        "Group estimators: use the (KL-shaped) reward itself as the advantage, no group baseline or scaling."))

    @property
    def needs_reference(self) -> bool:
        """Whether a KL term (loss or reward penalty) needs the reference model's logprobs."""
        return self.use_kl_loss or self.kl_coef > 0

    @property
    def uses_critic(self) -> bool:
        """Whether a value model is trained alongside the policy (PPO's GAE)."""
        return self.advantage_estimator == "ppo"

    @property
    def policy_loss_name(self) -> str:
        """The registered policy loss of this estimator: gspo and cispo have their own, the rest PPO clip."""
        return self.advantage_estimator if self.advantage_estimator in ("gspo", "cispo") else "ppo_clip"


@dataclass
class RewardConfig:
    rm_type: str | None = field(default=None, metadata=meta(
        "Built-in reward: exact, math (math-verify), f1 (token F1), deepscaler (the answer after </think>), "
        "remote_rm (HTTP, --rm-url), random (seeded by --rollout-seed); a 'boxed_' prefix (boxed_exact, "
        "boxed_math, boxed_f1) first extracts the last \\boxed{...} answer."))
    custom_rm_path: str | None = field(default=None, metadata=meta(
        "A reward function by path: [async] fn(sample) -> float | dict, or slime's fn(args, sample)."))
    group_rm: bool = field(default=False, metadata=meta(
        "--custom-rm-path scores a whole prompt group per call: fn(samples) -> list[float | dict] "
        "(slime: fn(args, samples))."))
    reward_timeout: float = field(default=120.0, metadata=meta(
        "Seconds one reward call may take; a slower call fails its sample (0: no limit)."))
    rm_url: str | None = field(default=None, metadata=meta("URL the remote_rm reward POSTs each sample to."))
    rm_timeout: float = field(default=30.0, metadata=meta("Seconds per remote_rm HTTP request."))
    rm_max_retries: int = field(default=3, metadata=meta(
        "Retries of a remote_rm request after a connection error, timeout, 429 or 5xx (exponential backoff)."))
    rm_max_connections: int = field(default=64, metadata=meta("Most remote_rm requests in flight at once."))
    reward_key: str | None = field(default=None, metadata=meta("Key of the scalar to train on when rewards are dicts."))
    overlong_buffer_len: int | None = field(default=None, metadata=meta(
        "DAPO soft overlong punishment (off by default): the last L tokens of --rollout-max-response-len M "
        "are a buffer; a response of n > M - L tokens gets -P * (n - (M - L)) / L added to its float reward."))
    overlong_penalty_factor: float = field(default=1.0, metadata=meta(
        "P of --overlong-buffer-len: the penalty at n = M."))


@dataclass
class EvalConfig:
    eval_interval: int | None = field(default=None, metadata=meta("Evaluate every N rollout steps (and at the end)."))
    eval_prompt_data: list[str] = field(default_factory=list, metadata=meta(
        "Eval sets as NAME PATH pairs: --eval-prompt-data add data/add.jsonl rev data/rev.jsonl.",
        metavar="NAME PATH"))
    eval_sft_data: list[str] = field(default_factory=list, metadata=meta(
        "Held-out SFT sets as NAME PATH pairs, rows read as --prompt-data's (with --rollout-function-path sft): "
        "at each evaluation the trainer's mean NLL over their trained tokens is logged as eval/NAME/sft_loss. "
        "A forward pass of the trainer: no engine starts for it.", metavar="NAME PATH"))
    n_samples_per_eval_prompt: int = field(default=1, metadata=meta("Responses sampled per eval prompt."))
    eval_temperature: float | None = field(default=None, metadata=meta(
        "Eval sampling temperature (0: greedy); default: --rollout-temperature."))
    eval_top_p: float | None = field(default=None, metadata=meta("Eval nucleus mass; default: --rollout-top-p."))
    eval_top_k: int | None = field(default=None, metadata=meta(
        "Eval top-k sampling (-1: off, 1: greedy); default: --rollout-top-k."))
    eval_max_response_len: int | None = field(default=None, metadata=meta(
        "Eval max new tokens; default: --rollout-max-response-len."))
    skip_eval_before_train: bool = field(default=False, metadata=meta("Do not evaluate before the first step."))
    eval_accuracy_threshold: float = field(default=1.0, metadata=meta(
        "eval/<set>/accuracy (and rollout/accuracy) is the fraction of samples whose scalar reward is >= this "
        "value; 1.0 fits 0/1 rewards such as --rm-type exact."))
    eval_function_path: str | None = field(default=None, metadata=meta(
        "Replaces evaluation: async fn(request: sluice.rollout.EvalRequest) -> dict[str, float] (metrics), or "
        "slime's fn(args, rollout_id, data_source, evaluation=True)."))


@dataclass
class CheckpointConfig:
    save: str | None = field(default=None, metadata=meta(
        "Directory to save checkpoints to: SAVE/rollout_<id>/ holds the model, optimizer and LR schedule, the "
        "reference and critic models where used, the data cursor, RNG states, step, weight version, config "
        "(config.yaml) and an hf/ export; SAVE/latest names the newest. Each save is atomic: a crash during one "
        "leaves the previous checkpoint intact."))
    load: str | None = field(default=None, metadata=meta(
        "Resume from a checkpoint: a --save directory (its latest) or one rollout_<id> directory. The same "
        "directory as --save may hold no checkpoint yet (the run then starts fresh), so one command line can be "
        "relaunched after a crash. A checkpoint of an incompatible config (data, batch sizes, estimator, loss "
        "type, trainer dtype, model shape) is refused, naming the fields."))
    save_interval: int | None = field(default=None, metadata=meta(
        "Save (and --save-hf export) every N rollout steps, and after the last one."))
    save_optim: bool = field(default=True, metadata=meta(
        "Save the optimizer state (AdamW moments, twice the model's size) with checkpoints. --no-save-optim "
        "leaves it out: a resume then restarts the moments from zero (the LR schedule position is kept)."))
    keep_checkpoints: int | None = field(default=None, metadata=meta(
        "Keep only the N newest checkpoints in --save, deleting older ones after each save (default: keep all)."))
    save_hf: str | None = field(default=None, metadata=meta(
        "Export the actor as a Hugging Face checkpoint (safetensors, config.json, tokenizer) whenever a save is "
        "due; {rollout_id} in the path becomes the rollout id (0-based, as in rollout_<id>), e.g. "
        "out/hf_{rollout_id}. Loads with transformers' from_pretrained and with sluice serve --model."))


@dataclass
class LoggingConfig:
    run_dir: str | None = field(default=None, metadata=meta(
        "This run's directory: metrics.jsonl (one JSON object per step), samples.jsonl, the config (config.yaml) "
        "and command line (commands.jsonl) it ran with, the plots, summary.html and, with --use-wandb, wandb/. "
        "Default: a new runs/<date>-<time> (runs/latest links to the newest); with --load, the run directory "
        "recorded in the checkpoint. A directory that holds another run's records is refused unless --load "
        "resumes that run or --overwrite-run-dir is given."))
    overwrite_run_dir: bool = field(default=False, metadata=meta(
        "Start a new run in a --run-dir that holds an earlier run's records: they (metrics.jsonl, samples.jsonl, "
        "config.yaml, commands.jsonl, plots, summary.html, tensorboard/, wandb/) are deleted first. Checkpoints in "
        "--save are never deleted. Never recorded as true in the run's config.yaml, so a rerun of it is checked "
        "again."))
    num_logged_samples: int = field(default=2, metadata=meta(
        "Example prompt / response / reward triples kept per rollout step and per eval set: printed (truncated) "
        "to the console and written in full to RUN_DIR/samples.jsonl and summary.html; 0: none."))
    progress_bar: bool = field(default=True, metadata=meta(
        "Show progress bars with ETA for the run and for each rollout (off, or when stdout is not a terminal: "
        "one log line per step, with an ETA)."))
    use_tensorboard: bool = field(default=False, metadata=meta(
        "Also write every step's metrics as TensorBoard event files (to --tensorboard-dir)."))
    tensorboard_dir: str | None = field(default=None, metadata=meta(
        "Directory of the TensorBoard event files; default: RUN_DIR/tensorboard."))
    use_wandb: bool = field(default=False, metadata=meta(
        "Also log every step's metrics and the config to Weights & Biases (pip install 'sluice[wandb]')."))
    wandb_project: str | None = field(default=None, metadata=meta("W&B project; default: sluice."))
    wandb_group: str | None = field(default=None, metadata=meta("W&B group of the run."))
    wandb_mode: str | None = field(default=None, metadata=meta(
        "W&B mode: online, offline (written under RUN_DIR/wandb with no network; upload later with `wandb sync`) "
        "or disabled; default: the WANDB_MODE environment variable, else online.",
        choices=("online", "offline", "disabled")))


@dataclass
class DebugConfig:
    debug_rollout_only: bool = field(default=False, metadata=meta(
        "Generate, score and evaluate rollouts without training or weight sync (no trainer is built): the engine "
        "keeps the initial weights. Combine with --save-debug-rollout-data to record rollouts."))
    debug_train_only: bool = field(default=False, metadata=meta(
        "Train on rollouts replayed from --load-debug-rollout-data with no engine at all (no generation, weight "
        "sync or evaluation)."))
    save_debug_rollout_data: str | None = field(default=None, metadata=meta(
        "Write each rollout's scored samples as JSON to this path; {rollout_id} becomes the rollout id "
        "(0-based), e.g. debug/rollout_{rollout_id}.json."))
    load_debug_rollout_data: str | None = field(default=None, metadata=meta(
        "Replay rollouts written by --save-debug-rollout-data (the same path template) instead of generating: "
        "rollout id k trains on the samples saved for k. Training from the same starting point reproduces the "
        "same steps."))


@dataclass
class ClusterConfig:
    """Where the train and rollout pools run. A run on one process (the default, no Ray) needs none of this."""

    orchestrator: str = field(default="auto", metadata=meta(
        "local: trainer and engine in this process; ray: Ray actors in placement groups (this machine, or the "
        "cluster at RAY_ADDRESS / --ray-address); auto: ray when any pool flag below asks for more than one "
        "process.", choices=("auto", "local", "ray")))
    ray_address: str | None = field(default=None, metadata=meta(
        "Ray cluster to join: HOST:PORT of its head (ray start --head --port), or auto: the cluster a job "
        "submitted with `ray job submit` runs in (its RAY_ADDRESS), else one that `ray start` runs on this machine. "
        "Default: RAY_ADDRESS, else a Ray instance of this run alone, started on this machine and stopped at the "
        "end."))
    actor_num_nodes: int = field(default=1, metadata=meta("Nodes of the train pool."))
    actor_num_gpus_per_node: int = field(default=1, metadata=meta(
        "Trainer processes per node (one GPU each; on a machine without GPUs, one CPU each). The train pool "
        "trains data-parallel over actor-num-nodes x this."))
    rollout_num_gpus: int | None = field(default=None, metadata=meta(
        "GPUs of the rollout pool (on a machine without GPUs: CPU slots); default: the train pool's with "
        "--colocate, else 1."))
    rollout_num_gpus_per_engine: int = field(default=1, metadata=meta("GPUs per engine (tensor-parallel size)."))
    colocate: bool = field(default=False, metadata=meta(
        "Train and rollout pools share the same devices, taking turns (see --offload-train/--offload-rollout)."))
    offload: bool = field(default=False, metadata=meta("Both --offload-train and --offload-rollout."))
    offload_train: bool = field(default=False, metadata=meta(
        "With --colocate: move the trainer's weights and optimizer state off the GPU while the engines generate."))
    offload_rollout: bool = field(default=False, metadata=meta(
        "With --colocate: release the engines' KV cache while the trainer trains."))

    @property
    def distributed(self) -> bool:
        """Whether the pools are Ray actors: --orchestrator ray, or auto with a pool flag asking for more than
        the one-process layout."""
        if self.orchestrator != "auto":
            return self.orchestrator == "ray"
        return (self.train_world_size > 1 or self.num_engines > 1 or self.rollout_num_gpus is not None
                or self.ray_address is not None)

    @property
    def train_world_size(self) -> int:
        return self.actor_num_nodes * self.actor_num_gpus_per_node

    @property
    def rollout_slots(self) -> int:
        if self.rollout_num_gpus is not None:
            return self.rollout_num_gpus
        return self.train_world_size if self.colocate else 1

    @property
    def num_engines(self) -> int:
        return max(1, self.rollout_slots // self.rollout_num_gpus_per_engine)


@dataclass
class SyncConfig:
    """How and when weights flow trainer -> engines, and how far generation may run ahead of training."""

    async_train: bool = field(default=False, metadata=meta(
        "Generate the next rollout while the trainer trains on this one (one step off-policy, or up to "
        "--max-staleness); weights reach the engines between engine steps.", flag="--async"))
    update_weights_interval: int = field(default=1, metadata=meta(
        "Push the trainer's weights to the engines every N training steps."))
    weight_sync_method: str = field(default="auto", metadata=meta(
        "in_process: the engine copies the trainer's tensors (one process); broadcast: bucketed "
        "torch.distributed broadcast to engine processes (NCCL on GPU, gloo on CPU); ipc: engine processes on the "
        "trainer's host map its GPU buffers by CUDA IPC handles and copy device to device (a GPU trainer; the way "
        "to an engine process on the trainer's own GPU); disk: safetensors files the engines load; auto: "
        "in_process for a local run, broadcast for Ray.",
        choices=("auto", "in_process", "broadcast", "ipc", "disk")))
    update_weight_buffer_size: int = field(default=512 * 2**20, metadata=meta(
        "Bytes per broadcast bucket of a weight sync."))
    update_weights_timeout: float = field(default=300.0, metadata=meta(
        "Seconds a weight sync may take before the run stops with an error naming the engine."))
    weight_sync_dir: str | None = field(default=None, metadata=meta(
        "Directory for --weight-sync-method disk (default: <run dir>/weight_sync)."))


@dataclass
class Config:
    """The whole run. Each component receives its own section only."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    # Not a section and not a flag: the slime / Megatron / SGLang flags given that sluice accepts without a config
    # field of their own (no-ops, and flags mapped onto sluice's fields), flag -> its words. Filled by the parser,
    # logged once at start (slime_compat.noop_notes), never saved: the flags they map to are.
    compat_flags: dict[str, list[str]] = field(default_factory=dict, metadata={"internal": True})

    @property
    def samples_per_rollout(self) -> int:
        return (self.rollout.rollout_batch_size or 0) * self.rollout.n_samples_per_prompt

    @property
    def global_batch_size(self) -> int:
        return self.train.global_batch_size or self.samples_per_rollout

    @property
    def staleness_bound(self) -> int:
        """--max-staleness, or its default: 0 for the sync loop, --update-weights-interval for --async."""
        if self.rollout.max_staleness is not None:
            return self.rollout.max_staleness
        return self.sync.update_weights_interval if self.sync.async_train else 0

    @property
    def eval_sets(self) -> list[tuple[str, str]]:
        """--eval-prompt-data as (name, path) pairs."""
        items = self.eval.eval_prompt_data
        return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]

    @property
    def eval_sft_sets(self) -> list[tuple[str, str]]:
        """--eval-sft-data as (name, path) pairs."""
        items = self.eval.eval_sft_data
        return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
