"""Training curves as a PNG, from metrics.jsonl alone, so a run can be judged without a tracking server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Figure + its Agg canvas, never pyplot: pyplot keeps global figure state and picks a display backend,
# which breaks on headless machines and in threads; this draws straight to a file.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sluice.observability.keys import REWARD_MEAN, STEP_TIME, eval_accuracy_name
from sluice.observability.metrics import read_metrics


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records that have it as a number; null (NaN) points are left out."""
    steps: list[float] = []
    values: list[float] = []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            steps.append(record["step"])
            values.append(value)
    return steps, values


def plot_curves(metrics_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """Draw rollout reward mean and every ``eval/<name>/accuracy`` against step; returns the PNG's path.

    Rewards and eval accuracies get separate panels because they live on different scales and cadences
    (every step vs every few steps). With no eval points the figure has only the reward panel, and an
    empty metrics file still yields a PNG saying so, so a plotting call at the end of a run never fails.
    """
    records = read_metrics(metrics_path)
    eval_keys = sorted({key for record in records for key in record if eval_accuracy_name(key)})
    eval_series = {key: _series(records, key) for key in eval_keys}
    eval_series = {key: series for key, series in eval_series.items() if series[0]}

    panels = 2 if eval_series else 1
    fig = Figure(figsize=(7, 3.2 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]

    reward_ax = axes[0]
    steps, values = _series(records, REWARD_MEAN)
    if steps:
        reward_ax.plot(steps, values, marker="." if len(steps) < 50 else None, label="reward mean")
    else:
        reward_ax.text(0.5, 0.5, "no reward points", ha="center", va="center", transform=reward_ax.transAxes)
    reward_ax.set_title("rollout reward mean")
    reward_ax.set_xlabel("step")
    reward_ax.set_ylabel("reward")
    reward_ax.grid(alpha=0.3)

    if eval_series:
        eval_ax = axes[1]
        for key, (steps, values) in eval_series.items():
            eval_ax.plot(steps, values, marker="o", label=eval_accuracy_name(key))
        eval_ax.set_title("eval accuracy")
        eval_ax.set_xlabel("step")
        eval_ax.set_ylabel("accuracy")
        eval_ax.grid(alpha=0.3)
        eval_ax.legend(loc="best", fontsize="small")

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


# ---- the report panels of `sluice plot` ----------------------------------------------------------------

def _new_figure(panels: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(7, 3.0 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(panels, 1, squeeze=False)[:, 0])


def _lines(ax, records: list[dict[str, Any]], keys: list[str], title: str, ylabel: str,
           labels: dict[str, str] | None = None) -> bool:
    """One line per key that has points; returns whether anything was drawn (else says so on the axes)."""
    drawn = False
    for key in keys:
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=(labels or {}).get(key, key))
            drawn = True
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return drawn


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=90)
    return out


def _keys_matching(records: list[dict[str, Any]], prefix: str, suffix: str) -> list[str]:
    return sorted({k for r in records for k in r if k.startswith(prefix) and k.endswith(suffix)})


def plot_rewards(records: list[dict[str, Any]], out: Path) -> Path:
    """Rollout reward (mean, accuracy) and every eval set's accuracy and reward."""
    fig, (rollout_ax, eval_ax) = _new_figure(2)
    _lines(rollout_ax, records, [REWARD_MEAN, "rollout/accuracy"], "rollout reward", "reward")
    eval_keys = _keys_matching(records, "eval/", "/accuracy") + _keys_matching(records, "eval/", "/reward_mean")
    _lines(eval_ax, records, eval_keys, "eval", "accuracy / reward")
    return _save(fig, out)


def plot_response_length(records: list[dict[str, Any]], out: Path) -> Path:
    """Response length: mean and percentiles as lines, min to max as a band."""
    fig, (ax,) = _new_figure(1)
    keys = ["rollout/response_len_mean", "rollout/response_len_p50", "rollout/response_len_p90",
            "rollout/response_len_p99"]
    _lines(ax, records, keys, "response length (tokens)", "tokens",
           {k: k.rsplit("_", 1)[-1] for k in keys})
    low_steps, low = _series(records, "rollout/response_len_min")
    high_steps, high = _series(records, "rollout/response_len_max")
    if low_steps and low_steps == high_steps:
        ax.fill_between(low_steps, low, high, alpha=0.15, label="min-max")
        ax.legend(loc="best", fontsize="small")
    return _save(fig, out)


def plot_kl_entropy(records: list[dict[str, Any]], out: Path) -> Path:
    """KL terms (to the old policy, to the reference) and the policy's entropy."""
    fig, (kl_ax, entropy_ax) = _new_figure(2)
    _lines(kl_ax, records, ["train/ppo_kl", "train/kl_loss"], "KL", "nats / token")
    _lines(entropy_ax, records, ["train/entropy"], "entropy", "nats / token")
    return _save(fig, out)


def plot_optimization(records: list[dict[str, Any]], out: Path) -> Path:
    """Loss, gradient norm, clip fractions and the trainer-vs-engine logprob mismatch."""
    fig, (loss_ax, clip_ax) = _new_figure(2)
    _lines(loss_ax, records, ["train/loss", "train/grad_norm"], "loss and gradient norm", "value")
    _lines(clip_ax, records, ["train/clipfrac", "train/rollout_logprob_abs_diff"],
           "clip fraction and logprob mismatch", "fraction / nats")
    return _save(fig, out)


def plot_throughput(records: list[dict[str, Any]], out: Path) -> Path:
    """Tokens per second of each stage that counts tokens."""
    fig, (ax,) = _new_figure(1)
    keys = _keys_matching(records, "perf/", "_tokens_per_s")
    _lines(ax, records, keys, "throughput", "tokens / s", {k: k[5:-len("_tokens_per_s")] for k in keys})
    return _save(fig, out)


def plot_stage_times(records: list[dict[str, Any]], out: Path) -> Path:
    """Where each step's time went: one stacked bar per step, one colour per stage."""
    fig, (ax,) = _new_figure(1)
    order = {f"perf/{stage}_time_s": i for i, stage in enumerate(("rollout", "train", "sync", "eval", "save"))}
    keys = sorted((k for k in _keys_matching(records, "perf/", "_time_s") if k != STEP_TIME),
                  key=lambda k: (order.get(k, len(order)), k))  # pipeline order, then any other stage
    steps = sorted({r["step"] for r in records if any(k in r for k in keys)})
    bottom = [0.0] * len(steps)
    for key in keys:
        by_step = dict(zip(*_series(records, key)))
        heights = [by_step.get(step, 0.0) for step in steps]
        ax.bar(steps, heights, bottom=bottom, label=key[5:-len("_time_s")], width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    if keys and steps:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("time per step by stage")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out)


# File name -> (panel function, caption); the order of the HTML page.
REPORT_PANELS = {
    "reward.png": (plot_rewards, "Reward and eval curves"),
    "response_length.png": (plot_response_length, "Response length"),
    "kl_entropy.png": (plot_kl_entropy, "KL and entropy"),
    "optimization.png": (plot_optimization, "Loss, gradient norm, clipping, logprob mismatch"),
    "throughput.png": (plot_throughput, "Throughput"),
    "stage_time.png": (plot_stage_times, "Stage time breakdown"),
}
