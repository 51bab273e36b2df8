"""The loss of one micro-batch: policy (SFT, or custom) loss + KL - entropy bonus, aggregated over the step.

Every term is reduced with ``aggregate`` (--loss-agg-mode) using counts of the WHOLE optimizer step
(``num_tokens`` trained tokens, ``num_sequences`` sequences with a trained token, ``max_len`` the rollout's
max response length), so the sum of micro-batch losses is the full-batch loss whatever the micro-batch
size. Metrics are token means with the step's token count as divisor, returned as sums to be added up
across micro-batches: 0-d tensors left on the device (a plug-in's own metrics may be floats), so that a step
reads them back once (``metric_floats``) instead of waiting for the device at every micro-batch.
"""

from __future__ import annotations

import torch

from sluice import algorithms
from sluice.algorithms import aggregate, importance_weight, kl_estimate, sft_nll
from sluice.config import AlgorithmConfig
from sluice.trainer.custom_loss import CustomLossFn, LossInputs, call_custom_loss
from sluice.types import TrainBatch

ROLLOUT_LOGPROB_ABS_DIFF = "train/rollout_logprob_abs_diff"
# k3 estimate of KL(rollout policy || trainer policy): the engine sampled the tokens, so the rollout policy is the
# sampling distribution the estimator needs. Nonzero in a synchronous run too, where the two differ only by
# numerics (kernels, dtype); it grows with staleness in an async run.
ROLLOUT_POLICY_KL = "train/rollout_policy_kl"
# k3 estimate of KL(trainer policy || reference model), logged whenever a reference model is loaded, whatever
# --kl-loss-type and --kl-loss-coef (slime's --use-kl-loss --kl-loss-coef 0 loads it only to log the KL).
REF_KL = "train/ref_kl"


def rollout_mismatch(log_probs: torch.Tensor, rollout_log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token gaps between the trainer's logprobs and the engine's, by metric name (mask them before use)."""
    log_probs = log_probs.detach()
    return {ROLLOUT_LOGPROB_ABS_DIFF: (log_probs - rollout_log_probs).abs(),
            ROLLOUT_POLICY_KL: kl_estimate(rollout_log_probs, log_probs, "k3")}


def micro_batch_loss(
    config: AlgorithmConfig,
    batch: TrainBatch,
    log_probs: torch.Tensor,
    entropy: torch.Tensor | None,
    num_tokens: float,
    num_sequences: int,
    max_len: int | None = None,
    custom_loss: CustomLossFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The scalar loss of one micro-batch (its share of the step's loss) and its metrics (shares, to be summed).

    ``custom_loss`` is the loaded --custom-loss-function-path function, needed with --loss-type custom_loss.
    """
    mask = batch.loss_mask

    def reduce(x: torch.Tensor) -> torch.Tensor:  # --loss-agg-mode over the step's counts
        return aggregate(x, mask, config.loss_agg_mode, num_tokens=num_tokens, num_sequences=num_sequences,
                         max_len=max_len)

    def token_mean(x: torch.Tensor) -> torch.Tensor:  # metrics: a token mean over the step whatever the agg mode
        return aggregate(x.detach(), mask, "token_mean", num_tokens=num_tokens, num_sequences=num_sequences)

    metrics: dict[str, torch.Tensor | float] = {}
    custom = torch.zeros(())
    per_token = torch.zeros_like(log_probs)
    if config.loss_type == "sft_loss":  # SFT targets come from data, not the engine: no rollout logprobs
        per_token = sft_nll(log_probs)
    else:
        metrics.update({k: token_mean(v) for k, v in rollout_mismatch(log_probs, batch.rollout_log_probs).items()})
        if config.loss_type == "custom_loss":
            if custom_loss is None:
                raise ValueError("--loss-type custom_loss needs the loaded --custom-loss-function-path function")
            custom, custom_metrics = call_custom_loss(custom_loss, LossInputs(log_probs, entropy, batch, reduce))
            metrics.update(custom_metrics)
        else:
            per_token = _policy_loss(config, batch, log_probs, token_mean, metrics)
    if config.use_kl_loss:
        kl = kl_estimate(log_probs, batch.ref_log_probs, config.kl_loss_type)
        per_token = per_token + config.kl_loss_coef * kl
        metrics["train/kl_loss"] = token_mean(kl.detach())
    if batch.ref_log_probs is not None:  # k3 whatever the loss uses; a k3 KL loss has just measured it
        reused = config.use_kl_loss and config.kl_loss_type == "k3"
        metrics[REF_KL] = metrics["train/kl_loss"] if reused else token_mean(
            kl_estimate(log_probs.detach(), batch.ref_log_probs, "k3"))
    if entropy is not None:
        if config.entropy_coef:
            per_token = per_token - config.entropy_coef * entropy
        metrics["train/entropy"] = token_mean(entropy.detach())
    loss = reduce(per_token) + custom.to(log_probs.device)
    metrics["train/loss"] = loss.detach()
    return loss, metrics


def metric_floats(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Metric sums of device tensors and floats -> floats, with one read-back of all the tensors."""
    keys = [key for key, value in sums.items() if isinstance(value, torch.Tensor)]
    out = {key: float(value) for key, value in sums.items() if not isinstance(value, torch.Tensor)}
    if keys:
        out.update(zip(keys, torch.stack([sums[key].float().reshape(()) for key in keys]).tolist()))
    return out


def _policy_loss(config: AlgorithmConfig, batch: TrainBatch, log_probs: torch.Tensor, token_mean,
                 metrics: dict[str, torch.Tensor | float]) -> torch.Tensor:
    """Per-token policy loss of the estimator's registered loss, weighted by --tis-mode with --use-tis."""
    # Without a separate pass for old logprobs (one optimizer step per rollout, on-policy), the ratio is
    # exactly 1 with the gradient of the current policy: the detached current logprobs are the old ones.
    old = batch.old_log_probs if batch.old_log_probs is not None else log_probs.detach()
    loss_fn = algorithms.get("policy_loss", config.policy_loss_name)
    per_token, stats = loss_fn(log_probs, old, batch.advantages, config.eps_clip, config.eps_clip_high,
                               config.eps_clip_c, loss_mask=batch.loss_mask)
    if config.use_tis:
        if batch.old_log_probs is None:
            raise ValueError("--use-tis needs the trainer's old logprobs (batch.old_log_probs); none were computed")
        weight, tis_stats = importance_weight(config.tis_mode, batch.old_log_probs, batch.rollout_log_probs,
                                              batch.loss_mask, config.tis_clip_low, config.tis_clip)
        per_token = per_token * weight
        metrics["train/tis_weight_mean"] = token_mean(weight)
        metrics["train/tis_clipfrac"] = token_mean(tis_stats["clipped"])
    metrics["train/pg_loss"] = token_mean(per_token.detach())
    metrics["train/clipfrac"] = token_mean(stats["clipfrac"].float())
    metrics["train/ppo_kl"] = token_mean(stats["approx_kl"].detach())
    if "dual_clipfrac" in stats:
        metrics["train/dual_clipfrac"] = token_mean(stats["dual_clipfrac"])
    return per_token

