"""What a run directory records about how the run was started: the config it ran with (config.yaml, loadable
back with ``--config``) and one line per launch in commands.jsonl (the first start and every resume), with the
command line and the versions of sluice, Python and torch and the git commit of the sluice checkout.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import sluice
from sluice.config import Config, config_to_dict, save_config
from sluice.config.flags import flag_specs

RUN_CONFIG_FILE = "config.yaml"
COMMANDS_FILE = "commands.jsonl"
MASK = "***"
# Key flags besides the config's secret fields. argv is the whole process's command line, which need not be
# `sluice train`'s (a script that builds the run may take its own flags): `sluice serve`'s key flags and slime's
# --wandb-key are masked there too.
OTHER_SECRET_FLAGS = ("--api-key", "--admin-api-key", "--wandb-key")


@dataclass
class Launch:
    """One start of a run (its first, or a resume), as a line of commands.jsonl."""

    time: str  # UTC, ISO 8601
    argv: list[str]  # the process's own command line (sys.argv) as started, the value of every key flag masked
    command: list[str] | None  # the `sluice train` flags that built the run, where known (the CLI, the demo);
    # keys masked as in argv
    cwd: str  # relative paths in argv are relative to this
    resumed_from: str | None  # the checkpoint directory --load resumes from; None for a fresh start
    changed_settings: dict[str, list[Any]]  # config keys that differ from the previous launch's: [before, now]
    sluice_version: str
    git_commit: str | None  # HEAD of the sluice checkout, "+dirty" when it has uncommitted changes; None: no git
    python: str
    torch: str


def git_commit() -> str | None:
    """HEAD of the sluice checkout this package runs from (an editable install: <checkout>/src/sluice), with
    "+dirty" for uncommitted changes; None for an installed wheel, no git, or a git that does not answer."""
    checkout = Path(sluice.__file__).resolve().parents[2]
    if not ((checkout / ".git").exists() and (checkout / "pyproject.toml").is_file()):
        return None  # not a checkout: a wheel inside some other repository must not report that one's commit
    try:
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def secret_flags() -> frozenset[str]:
    """Flags whose value is a key: the config's secret fields (config.yaml leaves them blank) and OTHER_SECRET_FLAGS."""
    return frozenset(s.flag for s in flag_specs() if s.secret) | frozenset(OTHER_SECRET_FLAGS)


def masked_command(words: list[str]) -> list[str]:
    """``words`` with the value of every key flag replaced by MASK, given as ``--flag KEY`` or ``--flag=KEY``."""
    secret = secret_flags()
    masked: list[str] = []
    for word in words:
        flag, equals, _ = word.partition("=")
        if masked and masked[-1] in secret:
            masked.append(MASK)
        elif equals and flag in secret:
            masked.append(f"{flag}={MASK}")
        else:
            masked.append(word)
    return masked


def recorded_config(config: Config) -> Config:
    """The config as config.yaml keeps it: --overwrite-run-dir reads false, so running the file again with
    ``--config`` is checked against the run directory again instead of erasing the run it came from."""
    return dataclasses.replace(config, logging=dataclasses.replace(config.logging, overwrite_run_dir=False))


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The flat config dict a run directory's config.yaml holds, or None without one."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _changes(before: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, list[Any]]:
    if before is None:
        return {}
    return {key: [before.get(key), value] for key, value in now.items() if before.get(key) != value}


def record_launch(run_dir: str | os.PathLike[str], config: Config, command: list[str] | None,
                  resumed_from: os.PathLike[str] | None) -> Launch:
    """Write config.yaml (replacing the previous launch's) and add this launch to commands.jsonl: appended when
    the run has --load (a resume, or a relaunch that may become one), else as the file's first line (a new run;
    any earlier lines are of an attempt that never finished a step, see orchestration/run_dir.py)."""
    import torch  # the run loads it anyway; imported here so reading records (sluice plot) does not

    run_dir = Path(run_dir)
    kept = recorded_config(config)
    continues = config.checkpoint.load is not None
    launch = Launch(
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        argv=masked_command(sys.argv), command=masked_command(command) if command is not None else None,
        cwd=os.getcwd(),
        resumed_from=str(resumed_from) if resumed_from is not None else None,
        changed_settings=_changes(read_run_config(run_dir), config_to_dict(kept)) if continues else {},
        sluice_version=sluice.__version__, git_commit=git_commit(),
        python=platform.python_version(), torch=torch.__version__)
    save_config(kept, run_dir / RUN_CONFIG_FILE)
    with open(run_dir / COMMANDS_FILE, "a" if continues else "w", encoding="utf-8") as handle:
        handle.write(json.dumps(dataclasses.asdict(launch)) + "\n")
    return launch


def read_launches(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every launch recorded in ``run_dir``/commands.jsonl, oldest first (none without the file)."""
    path = Path(run_dir) / COMMANDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
