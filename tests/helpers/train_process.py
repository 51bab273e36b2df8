"""`sluice train` in a subprocess, killed once it has written its first checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

# `sluice train`, stopping itself (SIGSTOP) the moment its first checkpoint is complete, `latest` included, through
# the save's after_write hook (checkpoint.store.AfterWrite). Steps of the tiny test runs take tens of milliseconds,
# so a run that went on while the test noticed the checkpoint could save again, or end, before the SIGKILL.
STOP_AT_FIRST_CHECKPOINT = """
import os, signal, sys
from sluice import cli
from sluice.orchestration import checkpointing

save_checkpoint = checkpointing.save_checkpoint

def stop_once_latest_is_written(part):
    if part == "latest":
        os.kill(os.getpid(), signal.SIGSTOP)

def save_then_stop(*args, **kwargs):
    return save_checkpoint(*args, **{**kwargs, "after_write": stop_once_latest_is_written})

checkpointing.save_checkpoint = save_then_stop
raise SystemExit(cli.main(["train", *sys.argv[1:]]))
"""


def kill_after_first_checkpoint(argv: list[str], save: Path) -> str:
    """Start `sluice train` in a subprocess and SIGKILL it as soon as its first checkpoint exists (it waits,
    stopped, right after writing it); returns the checkpoint's name."""
    proc = subprocess.Popen([sys.executable, "-c", STOP_AT_FIRST_CHECKPOINT, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not (save / "latest").exists():
            assert proc.poll() is None, f"sluice train ended before its first checkpoint:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return (save / "latest").read_text().strip()
