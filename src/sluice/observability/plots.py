"""Training curves as a PNG, from metrics.jsonl alone, so a run can be judged without a tracking server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Figure + its Agg canvas, never pyplot: pyplot keeps global figure state and picks a display backend,
# which breaks on headless machines and in threads; this draws straight to a file.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sluice.observability.keys import REWARD_MEAN, eval_accuracy_name
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
