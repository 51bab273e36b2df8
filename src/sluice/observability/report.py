"""``sluice plot RUN_DIR``: the run's PNG panels and one static HTML page, from the run directory's records.

The page embeds every PNG (base64), so it can be mailed or attached to an issue as one file, links each to
its file next to it; it shows how the run was started (command line, versions, config), a table of every
metric's latest value, and the example samples (report_sections.py).
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.observability.metrics import read_metrics
from sluice.observability.plots import REPORT_PANELS, plot_curves
from sluice.observability.report_sections import config_section, launches_section, samples_section

SUMMARY_FILE = "summary.html"
PLOTS_DIR = "plots"


@dataclass
class RunReport:
    """The files ``render_report`` wrote."""

    curves: Path  # the overview PNG (rollout reward, eval accuracy), also drawn at the end of every run
    panels: list[Path]  # one PNG per REPORT_PANELS entry, in PLOTS_DIR
    html: Path  # the summary page


def latest_values(records: list[dict[str, Any]]) -> dict[str, tuple[int, Any]]:
    """Each metric's last logged value with its step (evals log every few steps, so their last differs)."""
    latest: dict[str, tuple[int, Any]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and value is not None:
                latest[key] = (record.get("step", 0), value)
    return dict(sorted(latest.items()))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _page(run_dir: Path, panels: list[tuple[Path, str]], records: list[dict[str, Any]], out_dir: Path) -> str:
    steps = [r["step"] for r in records if "step" in r]
    title = f"sluice run {run_dir}"
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "td.num{text-align:right;font-family:monospace}"
        "pre{white-space:pre-wrap;word-break:break-word;margin:0}td pre{max-width:24em}</style>",
        "</head>", "<body>", f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(records)} records, steps {min(steps, default=0)} to {max(steps, default=0)}.</p>",
    ]
    parts += launches_section(run_dir)
    for png, caption in panels:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        link = html.escape(os.path.relpath(png, out_dir))
        parts += [f"<h2>{html.escape(caption)}</h2>",
                  f"<a href=\"{link}\"><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\"></a>"]
    parts += ["<h2>Latest metrics</h2>", "<table>", "<tr><th>metric</th><th>step</th><th>value</th></tr>"]
    for key, (step, value) in latest_values(records).items():
        parts.append(f"<tr><td>{html.escape(key)}</td><td class=\"num\">{step}</td>"
                     f"<td class=\"num\">{html.escape(_format(value))}</td></tr>")
    parts += ["</table>"]
    parts += samples_section(run_dir) + config_section(run_dir)
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def render_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> RunReport:
    """Draw the overview and every panel of ``run_dir/metrics.jsonl`` and write the HTML page.

    Files go to ``out_dir`` (default: the run directory): curves.png, plots/<panel>.png, summary.html.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    records = read_metrics(run_dir)
    curves = plot_curves(run_dir, out / "curves.png")
    panels = [(draw(records, out / PLOTS_DIR / name), caption) for name, (draw, caption) in REPORT_PANELS.items()]
    page = out / SUMMARY_FILE
    page.write_text(_page(run_dir, [(curves, "Overview")] + panels, records, out), encoding="utf-8")
    return RunReport(curves, [png for png, _ in panels], page)
