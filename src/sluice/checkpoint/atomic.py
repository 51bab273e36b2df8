"""Directory writes that a crash cannot leave half-done: write to a staging directory, then rename it in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (created or renamed files); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def move_into_place(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an existing ``final`` (a re-save of the step) is moved aside first.

    A crash between the two renames leaves only ``.<name>.old``; ``find_latest`` moves it back.
    """
    if final.exists():
        retired = final.parent / f".{final.name}.old"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)
