"""The parts of summary.html read from the run directory's records rather than drawn from metrics: how the run
was started (commands.jsonl, config.yaml) and its example samples (samples.jsonl). Each returns HTML lines,
every value escaped: prompts and responses are model output and may hold any markup."""

from __future__ import annotations

import html
import shlex
from pathlib import Path
from typing import Any

from sluice.observability.run_record import RUN_CONFIG_FILE, read_launches
from sluice.observability.samples import read_samples


def _command_line(launch: dict[str, Any]) -> str:
    return shlex.join(launch.get("command") or launch.get("argv") or [])


def launches_section(run_dir: Path) -> list[str]:
    """Each start of the run (the first, then every resume): command line, versions, commit, changed settings."""
    launches = read_launches(run_dir)
    if not launches:
        return []
    parts = ["<h2>Command</h2>"]
    for number, launch in enumerate(launches):
        kind = f"resumed from {launch['resumed_from']}" if launch.get("resumed_from") else (
            "start" if number == 0 else "relaunch")
        versions = (f"sluice {launch.get('sluice_version')}, git {launch.get('git_commit') or 'unknown'}, "
                    f"Python {launch.get('python')}, torch {launch.get('torch')}, in {launch.get('cwd')}")
        parts += [f"<p class=\"launch\">{html.escape(launch.get('time', ''))}: {html.escape(kind)}</p>",
                  f"<pre class=\"command\">{html.escape(_command_line(launch))}</pre>",
                  f"<p class=\"versions\">{html.escape(versions)}</p>"]
        changed = launch.get("changed_settings") or {}
        if changed:
            items = ", ".join(f"{key}: {before!r} -> {now!r}" for key, (before, now) in sorted(changed.items()))
            parts.append(f"<p class=\"changed\">changed settings: {html.escape(items)}</p>")
    return parts


def config_section(run_dir: Path) -> list[str]:
    """The config the run ran with (config.yaml; `sluice train --config` loads it back), folded."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return []
    return ["<h2>Config</h2>", f"<details><summary>{html.escape(str(path))}</summary>",
            f"<pre class=\"config\">{html.escape(path.read_text(encoding='utf-8'))}</pre></details>"]


def samples_section(run_dir: Path) -> list[str]:
    """Every example sample of samples.jsonl, newest step first, in full."""
    records = read_samples(run_dir)
    if not records:
        return []
    parts = ["<h2>Samples</h2>", "<table class=\"samples\">",
             "<tr><th>step</th><th>source</th><th>reward</th><th>prompt</th><th>response</th><th>label</th></tr>"]
    for record in sorted(records, key=lambda r: -r.get("step", 0)):
        label = record.get("label")
        cells = [str(record.get("step")), str(record.get("source")), "" if record.get("reward") is None else f"{record['reward']:.4g}",
                 str(record.get("prompt", "")), str(record.get("response", "")), "" if label is None else str(label)]
        parts.append("<tr>" + "".join(f"<td><pre>{html.escape(cell)}</pre></td>" for cell in cells) + "</tr>")
    return parts + ["</table>"]
