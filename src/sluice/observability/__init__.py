"""What a run shows while and after it runs: metrics.jsonl, console progress, and curve plots."""

from sluice.observability.keys import EVAL_ACCURACY, REWARD_MEAN, STEP_TIME, eval_accuracy_name
from sluice.observability.metrics import METRICS_FILE, MetricsWriter, json_safe, read_metrics
from sluice.observability.plots import plot_curves
from sluice.observability.progress import ProgressReporter, StageBar

__all__ = [
    "EVAL_ACCURACY",
    "REWARD_MEAN",
    "STEP_TIME",
    "eval_accuracy_name",
    "METRICS_FILE",
    "MetricsWriter",
    "ProgressReporter",
    "StageBar",
    "json_safe",
    "plot_curves",
    "read_metrics",
]
