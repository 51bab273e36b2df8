"""The figures of a run, as data (plot_data.py's records), one builder per PNG: which metrics go on which axis.

Panels that only an async run has metrics for (staleness, the wait stage) appear only when those metrics do.
"""

from __future__ import annotations

from typing import Any

from sluice.observability.keys import REWARD_MEAN, STEP_TIME, eval_accuracy_name
from sluice.observability.plot_data import (STAGE_COLOURS, Axis, Band, Bars, Plot, keys_matching, lines,
                                           metric_colour, series)

Records = list[dict[str, Any]]
REWARD_STD = "rollout/reward_std"
STAGE_ORDER = ("rollout", "wait", "train", "sync", "eval", "save")  # pipeline order; other stages after


def reward_axis(records: Records) -> Axis:
    """Rollout reward mean (smoothed) with a mean +- std band of the raw values."""
    reward = lines(records, [REWARD_MEAN], {REWARD_MEAN: "reward mean"})
    bands: tuple[Band, ...] = ()
    mean_steps, means = series(records, REWARD_MEAN)
    std_by_step = dict(zip(*series(records, REWARD_STD)))
    paired = [(step, mean, std_by_step[step]) for step, mean in zip(mean_steps, means) if step in std_by_step]
    if paired:
        bands = (Band("mean ± std", tuple(p[0] for p in paired), tuple(p[1] - p[2] for p in paired),
                      tuple(p[1] + p[2] for p in paired), reward[0].colour),)
    return Axis("rollout reward", "reward", reward, bands, empty_note="no reward points")


def eval_axis(records: Records) -> Axis | None:
    """Each eval set's accuracy, and its reward mean on a twin axis; None when the run has no eval points."""
    accuracy = lines(records, [k for k in keys_matching(records, "eval/", "/accuracy") if eval_accuracy_name(k)],
                     smooth=False)
    reward_keys = keys_matching(records, "eval/", "/reward_mean")
    reward = lines(records, reward_keys, smooth=False, first_style=len(accuracy))
    if not accuracy and not reward:
        return None
    return Axis("eval", "accuracy", accuracy, right=reward, right_ylabel="reward mean")


def overview(records: Records) -> Plot:
    """curves.png, drawn at the end of every run: the reward, and eval accuracy when there is any."""
    panels: list[Axis] = [reward_axis(records)]
    evals = eval_axis(records)
    if evals is not None:
        panels.append(evals)
    return Plot(tuple(panels))


def rewards(records: Records) -> Plot:
    """Reward mean +- std; the batch fractions that say whether it can learn (accuracy, groups without a reward
    spread, truncation); eval, when the run has eval points."""
    fraction_keys = ["rollout/accuracy", "rollout/zero_std_group_fraction", "rollout/truncated_frac"]
    fractions = Axis("fractions of the rollout batch", "fraction",
                     lines(records, fraction_keys, {k: k.split("/")[1] for k in fraction_keys}), ylim=(-0.03, 1.03))
    panels = [reward_axis(records), fractions]
    evals = eval_axis(records)
    if evals is not None:
        panels.append(evals)
    return Plot(tuple(panels))


def response_length(records: Records) -> Plot:
    """Mean and percentiles as lines, min to max as a band."""
    keys = ["rollout/response_len_mean", "rollout/response_len_p50", "rollout/response_len_p90",
            "rollout/response_len_p99"]
    drawn = lines(records, keys, {k: k.rsplit("_", 1)[-1] for k in keys})
    low_steps, low = series(records, "rollout/response_len_min")
    high_steps, high = series(records, "rollout/response_len_max")
    bands = ()
    if low_steps and low_steps == high_steps:
        bands = (Band("min-max", tuple(low_steps), tuple(low), tuple(high), "#999999"),)
    return Plot((Axis("response length", "tokens", drawn, bands),))


def kl_entropy(records: Records) -> Plot:
    """KL to the reference; drift between the policy the engine sampled with and the trainer's; entropy."""
    ref = Axis("KL to the reference", "nats / token",
               lines(records, ["train/ref_kl", "train/kl_loss", "train/reward_kl"],
                     {"train/ref_kl": "ref_kl (k3)", "train/kl_loss": "kl_loss (--kl-loss-type)",
                      "train/reward_kl": "reward_kl (rollout policy)"}),
               empty_note="no reference model (loaded with --use-kl-loss or --kl-coef)")
    drift = Axis("policy drift", "KL, nats / token",
                 lines(records, ["train/rollout_policy_kl", "train/ppo_kl"],
                       {"train/rollout_policy_kl": "KL(rollout || trainer), k3", "train/ppo_kl": "ppo_kl (old vs new)"}),
                 right=lines(records, ["train/rollout_logprob_abs_diff"],
                             {"train/rollout_logprob_abs_diff": "|logp trainer - logp rollout|"}, first_style=2),
                 right_ylabel="mean |Δ logprob|, nats")
    entropy = Axis("entropy", "nats / token", lines(records, ["train/entropy"]))
    return Plot((ref, drift, entropy))


def optimization(records: Records) -> Plot:
    """Loss, gradient norm and clip fractions, each on its own axis (their scales differ by orders)."""
    loss = Axis("loss", "loss", lines(records, ["train/loss", "train/pg_loss"]))
    grad = Axis("gradient norm", "norm (before clipping)", lines(records, ["train/grad_norm", "train/critic_grad_norm"]))
    clip_keys = ["train/clipfrac", "train/dual_clipfrac", "train/tis_clipfrac", "train/value_clipfrac"]
    clip = Axis("clip fractions", "fraction of trained tokens", lines(records, clip_keys))
    return Plot((loss, grad, clip))


def throughput(records: Records) -> Plot:
    """Tokens per second of each stage that counts tokens, in the stage's colour."""
    keys = keys_matching(records, "perf/", "_tokens_per_s")
    return Plot((Axis("throughput", "tokens / s", lines(records, keys, {k: k[5:-len("_tokens_per_s")] for k in keys})),))


def is_async(records: Records) -> bool:
    """The async loop times a wait stage (the trainer waiting for a batch); a sync run has none."""
    return any("perf/wait_time_s" in r for r in records)


def stage_bars(records: Records) -> Bars:
    """Where each step's time went: one stacked bar per step, one fixed colour per stage."""
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    keys = sorted((k for k in keys_matching(records, "perf/", "_time_s") if k != STEP_TIME),
                  key=lambda k: (rank.get(k[5:-len("_time_s")], len(rank)), k))
    steps = sorted({r["step"] for r in records if any(k in r for k in keys)})
    layers = []
    for key in keys:
        stage = key[5:-len("_time_s")]
        by_step = dict(zip(*series(records, key)))
        layers.append((stage, tuple(by_step.get(step, 0.0) for step in steps),
                       STAGE_COLOURS.get(stage, metric_colour(key))))
    return Bars("time per step by stage", "seconds", tuple(steps), tuple(layers))


def pipeline(records: Records) -> Plot:
    """Stage times; each pool's idle fraction when logged; staleness in an async run."""
    panels: list[Axis | Bars] = [stage_bars(records)]
    idle_keys = keys_matching(records, "perf/", "_idle_frac")
    if idle_keys:
        panels.append(Axis("idle fraction of each pool", "fraction of the step",
                           lines(records, idle_keys, {k: k[5:-len("_idle_frac")] for k in idle_keys}),
                           ylim=(-0.03, 1.03)))
    if is_async(records):
        keys = ["rollout/staleness_mean", "rollout/staleness_max"]
        panels.append(Axis("staleness of the trained samples", "policy versions behind",
                           lines(records, keys, {k: k.rsplit("_", 1)[-1] for k in keys}, smooth=False)))
    return Plot(tuple(panels))
