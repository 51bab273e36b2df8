"""Example samples of each rollout step and each eval set: what the model actually wrote, next to its reward.

A reward curve says how often the model is right; a few responses say what it does (a format it drifts into,
an answer cut at the length limit, a reward function that scores the wrong thing). ``SampleLog`` keeps
--num-logged-samples of them per step and per eval set: in full in RUN_DIR/samples.jsonl (summary.html shows
them) and truncated on one console line each. They are the first sample of each of the first groups, so each
shows a different prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from sluice.types import SampleGroup

SAMPLES_FILE = "samples.jsonl"
PROMPT_CHARS = 60  # the console shows a prompt's end (where a chat template leaves the question) ...
RESPONSE_CHARS = 100  # ... and a response's start


@dataclass
class LoggedSample:
    """One example, as a line of samples.jsonl."""

    step: int  # rollout steps completed, as in metrics.jsonl (an eval before training: 0)
    source: str  # "rollout", or "eval/<set name>"
    prompt: str  # the prompt text; chat messages as "role: content" lines
    response: str
    reward: float | None  # None: not scored (SFT from data)
    label: Any  # the reference answer (--label-key), None without one
    status: str  # completed, truncated (hit the length limit), aborted, failed


def prompt_text(prompt: str | list[dict[str, Any]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def pick_samples(groups: Sequence[SampleGroup], rewards: Sequence[Sequence[float]] | None, step: int, source: str,
                 count: int) -> list[LoggedSample]:
    """The first sample of each of the first ``count`` groups (a different prompt each); ``rewards`` None: the
    samples were not scored."""
    out = []
    for group, group_rewards in list(zip(groups, rewards if rewards is not None else [None] * len(groups)))[:count]:
        if not group.samples:
            continue
        sample = group.samples[0]
        label = sample.label if sample.label is None or isinstance(sample.label, (str, int, float)) else str(sample.label)
        reward = float(group_rewards[0]) if group_rewards is not None else None
        out.append(LoggedSample(step, source, prompt_text(sample.prompt), sample.response, reward, label,
                                sample.status.value))
    return out


def _clip_end(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _clip_start(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def console_line(sample: LoggedSample) -> str:
    """One line: source, step, reward, the prompt's end and the response's start (repr: newlines stay visible)."""
    label = "" if sample.label is None else f" label={_clip_start(str(sample.label), PROMPT_CHARS)!r}"
    reward = "" if sample.reward is None else f"reward={sample.reward:.3g} "
    return (f"  sample {sample.source} step {sample.step}: {reward}"
            f"prompt={_clip_end(sample.prompt, PROMPT_CHARS)!r} "
            f"response={_clip_start(sample.response, RESPONSE_CHARS)!r}{label}")


class SampleLog:
    """Appends picked samples to ``run_dir``/samples.jsonl and shows each on the console.

    ``resume_after_step``: as for metrics.jsonl, records past a resumed checkpoint's step are dropped first (the
    resumed run logs those steps again).
    """

    def __init__(self, run_dir: str | os.PathLike[str], count: int, show: Callable[[str], None],
                 resume_after_step: int | None = None) -> None:
        self.path = Path(run_dir) / SAMPLES_FILE
        self.count, self.show = count, show
        if resume_after_step is not None and self.path.exists():
            kept = [r for r in read_samples(self.path) if r.get("step", 0) <= resume_after_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file: IO[str] | None = None

    def record(self, step: int, source: str, groups: Sequence[SampleGroup],
               rewards: Sequence[Sequence[float]] | None) -> None:
        """Keep and show up to ``count`` samples of ``groups`` (``rewards``: their scalar rewards, group by group;
        None: not scored)."""
        if self.count <= 0:
            return
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        for sample in pick_samples(groups, rewards, step, source, self.count):
            self._file.write(json.dumps(asdict(sample), default=str) + "\n")
            self.show(console_line(sample))
        self._file.flush()  # a killed run keeps every step's samples it showed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a samples file (or of ``path``/samples.jsonl for a run directory); a final line cut
    short by a crash is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / SAMPLES_FILE
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == len(lines):
                    break
                raise ValueError(f"{path}:{number}: not a JSON object: {error}") from error
    return records
