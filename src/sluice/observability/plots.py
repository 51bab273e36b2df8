"""Training curves as PNGs, from metrics.jsonl alone, so a run can be judged without a tracking server.

plot_panels.py decides what each figure shows (as data); this module only draws it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Figure + its Agg canvas, never pyplot: pyplot keeps global figure state and picks a display backend,
# which breaks on headless machines and in threads; this draws straight to a file.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sluice.observability import plot_panels
from sluice.observability.metrics import read_metrics
from sluice.observability.plot_data import Axis, Bars, Line, Plot

RAW_ALPHA = 0.3  # the raw curve behind its moving average: visible, but not competing with it
BAND_ALPHA = 0.15
MARKERS_PER_LINE = 12  # markers tell coinciding lines apart; more would clutter a long run


def _draw_line(ax, line: Line, index: int) -> None:
    """The raw values (faint when a moving average is drawn over them), then the average.

    Coinciding lines must all stay visible: each later line on an axis is drawn thinner, dashed and with
    hollow markers over the earlier ones, and the sparse markers are offset per line.
    """
    every = max(1, len(line.steps) // MARKERS_PER_LINE)
    style = dict(color=line.colour, linestyle=line.dash, linewidth=max(1.0, 2.2 - 0.5 * index),
                 marker=line.marker, markersize=4 + index, markevery=(index % every, every),
                 markerfacecolor=line.colour if index == 0 else "none")
    if line.smoothed is None:
        ax.plot(line.steps, line.values, label=line.label, **style)
        return
    ax.plot(line.steps, line.values, color=line.colour, linestyle="-", linewidth=0.8, alpha=RAW_ALPHA)
    ax.plot(line.steps, line.smoothed, label=f"{line.label} (EMA)", **style)


def _draw_axis(ax, panel: Axis) -> None:
    for band in panel.bands:
        ax.fill_between(band.steps, band.low, band.high, color=band.colour, alpha=BAND_ALPHA, linewidth=0,
                        label=band.label)
    for index, line in enumerate(panel.lines):
        _draw_line(ax, line, index)
    handles, labels = ax.get_legend_handles_labels()
    if panel.right:
        twin = ax.twinx()
        for index, line in enumerate(panel.right):
            _draw_line(twin, line, len(panel.lines) + index)
        twin.set_ylabel(panel.right_ylabel)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + [f"{label} (right)" for label in more_labels]
    if handles:
        ax.legend(handles, labels, loc="best", fontsize="small")
    elif not panel.bands:  # an empty axis: its note instead of meaningless 0..1 ticks
        ax.text(0.5, 0.5, panel.empty_note, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)


def _draw_bars(ax, panel: Bars) -> None:
    bottom = [0.0] * len(panel.steps)
    for stage, heights, colour in panel.layers:
        ax.bar(panel.steps, heights, bottom=bottom, label=stage, width=0.8, color=colour)
        bottom = [b + h for b, h in zip(bottom, heights)]
    if panel.layers and panel.steps:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3, axis="y")


def render(plot: Plot, out: str | os.PathLike[str], height_per_panel: float = 3.0) -> Path:
    """Draw ``plot`` (panels top to bottom, sharing the step axis) to a PNG at ``out``; returns its path."""
    fig = Figure(figsize=(8, height_per_panel * len(plot.panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(plot.panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, plot.panels):
        (_draw_bars if isinstance(panel, Bars) else _draw_axis)(ax, panel)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=90)
    return out


def plot_curves(metrics_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """The overview: rollout reward (mean +- std) and every ``eval/<name>/accuracy`` against step.

    With no eval points the figure has only the reward panel, and an empty metrics file still yields a PNG
    saying so, so a plotting call at the end of a run never fails.
    """
    return render(plot_panels.overview(read_metrics(metrics_path)), out_png, height_per_panel=3.2)


def _panel(build: Callable[[list[dict[str, Any]]], Plot]) -> Callable[[list[dict[str, Any]], Path], Path]:
    """A REPORT_PANELS drawing function: records -> the figure ``build`` describes, as a PNG at ``out``."""
    return lambda records, out: render(build(records), out)


# File name -> (panel function, caption); the order of the HTML page.
REPORT_PANELS = {
    "reward.png": (_panel(plot_panels.rewards), "Reward (mean ± std), batch fractions, eval"),
    "response_length.png": (_panel(plot_panels.response_length), "Response length"),
    "kl_entropy.png": (_panel(plot_panels.kl_entropy), "KL to the reference, policy drift, entropy"),
    "optimization.png": (_panel(plot_panels.optimization), "Loss, gradient norm, clip fractions"),
    "throughput.png": (_panel(plot_panels.throughput), "Throughput"),
    "stage_time.png": (_panel(plot_panels.pipeline),
                       "Time per stage, idle fraction of each pool, staleness (async runs)"),
}
