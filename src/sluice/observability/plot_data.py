"""What each plot shows, as plain records built from metrics.jsonl: axes, their lines, bands and bars, with
fixed colours and styles. plots.py draws them; tests read them without looking at pixels.

Rules the records follow, so a figure reads at a glance:
* one quantity per axis; a second quantity that belongs with it goes on a twin axis with its own scale
  (``Axis.right``), never on the first axis where its scale would flatten the other;
* a metric (and a pipeline stage) has the same colour in every figure and every run: a fixed table, then a
  hash of the name, never the order in which metrics happen to appear;
* lines on one axis differ in dash and marker too, so two that coincide (a KL of 0 and a clip fraction of 0)
  both stay visible;
* a noisy series is drawn raw (faint) and smoothed (an exponential moving average) on top.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

# Colour-blind-safe palette (Okabe-Ito, then two neutrals); indices are fixed, so are the colours.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000", "#999999")
STAGE_COLOURS = {
    "rollout": "#0072B2", "train": "#E69F00", "sync": "#009E73", "eval": "#CC79A7", "save": "#999999",
    "wait": "#56B4E9",  # the trainer waiting for a batch: a light blue, near the rollout it waits for
}
METRIC_COLOURS = {
    "rollout/reward_mean": "#0072B2", "rollout/accuracy": "#009E73", "rollout/zero_std_group_fraction": "#D55E00",
    "rollout/truncated_frac": "#CC79A7", "rollout/response_len_mean": "#0072B2",
    "rollout/response_len_p50": "#009E73", "rollout/response_len_p90": "#E69F00",
    "rollout/response_len_p99": "#D55E00", "rollout/staleness_mean": "#0072B2", "rollout/staleness_max": "#D55E00",
    "train/ref_kl": "#0072B2", "train/kl_loss": "#56B4E9", "train/reward_kl": "#009E73",
    "train/rollout_policy_kl": "#D55E00", "train/ppo_kl": "#CC79A7", "train/rollout_logprob_abs_diff": "#999999",
    "train/entropy": "#009E73", "train/loss": "#0072B2", "train/pg_loss": "#56B4E9", "train/grad_norm": "#E69F00",
    "train/critic_grad_norm": "#999999", "train/clipfrac": "#D55E00", "train/dual_clipfrac": "#CC79A7",
    "train/tis_clipfrac": "#009E73", "train/value_clipfrac": "#999999",
}
DASHES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")
SMOOTHING_SPAN_FRACTION = 1 / 20  # the moving average spans about this share of the run's points
MAX_SMOOTHING_WEIGHT = 0.9


def metric_colour(key: str) -> str:
    """The fixed colour of a metric: its table entry, its stage's colour (perf/<stage>_...), or a hash of its
    name (eval/<set>/... by the set's name, so a set keeps one colour across its metrics)."""
    if key in METRIC_COLOURS:
        return METRIC_COLOURS[key]
    parts = key.split("/")
    if parts[0] == "perf":
        stage = parts[-1].split("_")[0]
        if stage in STAGE_COLOURS:
            return STAGE_COLOURS[stage]
    name = parts[1] if parts[0] == "eval" and len(parts) > 2 else key
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def smoothing_weight(num_points: int) -> float:
    """EMA weight for a series of ``num_points``: light, so the curve does not lag the run.

    An EMA of weight w averages over about (1 + w) / (1 - w) points; that span is set to a twentieth of the
    series, so up to 20 points nothing is smoothed (each point matters), 60 points get w = 0.5, and a long run
    at most MAX_SMOOTHING_WEIGHT.
    """
    span = num_points * SMOOTHING_SPAN_FRACTION
    if span <= 1.0:
        return 0.0
    return min(MAX_SMOOTHING_WEIGHT, (span - 1.0) / (span + 1.0))


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's smoothing) so the start is not pulled to 0."""
    out, running, norm = [], 0.0, 0.0
    for value in values:
        running = weight * running + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        out.append(running / norm)
    return out


@dataclass(frozen=True)
class Line:
    """One metric against step."""

    key: str  # the metric's name in metrics.jsonl
    label: str
    steps: tuple[float, ...]
    values: tuple[float, ...]  # raw, as logged
    colour: str
    dash: str  # matplotlib linestyle
    marker: str
    smoothed: tuple[float, ...] | None = None  # the EMA, drawn over the faint raw line; None: too few points


@dataclass(frozen=True)
class Band:
    """A shaded range (mean +- std, min to max)."""

    label: str
    steps: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    colour: str


@dataclass(frozen=True)
class Axis:
    """One panel of lines against step, with an optional twin axis on the right for a second quantity."""

    title: str
    ylabel: str
    lines: tuple[Line, ...]
    bands: tuple[Band, ...] = ()
    right: tuple[Line, ...] = ()  # drawn against their own y scale
    right_ylabel: str = ""
    empty_note: str = "no points"  # shown when the axis has nothing to draw
    ylim: tuple[float, float] | None = None

    @property
    def keys(self) -> list[str]:
        return [line.key for line in self.lines + self.right]


@dataclass(frozen=True)
class Bars:
    """Stacked bars per step, one layer per stage."""

    title: str
    ylabel: str
    steps: tuple[float, ...]
    layers: tuple[tuple[str, tuple[float, ...], str], ...]  # (stage, height per step, colour)


@dataclass(frozen=True)
class Plot:
    """A figure: its panels, top to bottom."""

    panels: tuple[Axis | Bars, ...]

    def axis(self, title: str) -> Axis | Bars:
        """The panel of that title (tests and callers find panels by what they show)."""
        for panel in self.panels:
            if panel.title == title:
                return panel
        raise KeyError(f"no panel titled {title!r}; panels: {[p.title for p in self.panels]}")


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records that have it as a number; null (NaN) points are left out."""
    steps: list[float] = []
    values: list[float] = []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            steps.append(record["step"])
            values.append(value)
    return steps, values


def lines(records: list[dict[str, Any]], keys: list[str], labels: dict[str, str] | None = None,
          smooth: bool = True, first_style: int = 0) -> tuple[Line, ...]:
    """A Line per key with points; the n-th gets the n-th dash and marker (from ``first_style``)."""
    out = []
    for key in keys:
        steps, values = series(records, key)
        if not steps:
            continue
        style = first_style + len(out)
        weight = smoothing_weight(len(values)) if smooth else 0.0
        out.append(Line(key, (labels or {}).get(key, key), tuple(steps), tuple(values), metric_colour(key),
                        DASHES[style % len(DASHES)], MARKERS[style % len(MARKERS)],
                        tuple(ema(values, weight)) if weight > 0 else None))
    return tuple(out)


def keys_matching(records: list[dict[str, Any]], prefix: str, suffix: str) -> list[str]:
    return sorted({k for r in records for k in r if k.startswith(prefix) and k.endswith(suffix)})
