"""`sluice train` in a subprocess, killed the moment it has written its first checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def kill_after_first_checkpoint(argv: list[str], save: Path) -> str:
    """Start `sluice train` in a subprocess and SIGKILL it as soon as a checkpoint exists; returns its name."""
    proc = subprocess.Popen([sys.executable, "-m", "sluice.cli", "train", *argv], stdout=subprocess.DEVNULL,
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
