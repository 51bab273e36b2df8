"""The user's part of a traceback: a plug-in's error shown from its own frames on.

An error raised in a user's function travels through the rollout's scoring, the plug-in adapters, asyncio and a
worker thread before anyone reports it; those frames say nothing about the bug, and a full traceback buries the
two lines that do. The cut is made at the first frame outside sluice and the runtime (asyncio, threading): what
the user's function calls afterwards (its own helpers, a library, even sluice) is kept.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from pathlib import Path

_PACKAGE_DIR = str(Path(__file__).resolve().parent)  # src/sluice: frames of ours
_RUNTIME_PATHS = (str(Path(asyncio.__file__).parent), threading.__file__)  # the event loop and worker threads


def _is_ours(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR) or filename.startswith(_RUNTIME_PATHS)


def user_traceback(error: BaseException) -> str:
    """The traceback of ``error`` from its first frame outside sluice and the runtime, then the error itself
    (only the error line where every frame is ours, e.g. a timeout or a return value sluice refused)."""
    frames = traceback.extract_tb(error.__traceback__)
    first_user = next((i for i, frame in enumerate(frames) if not _is_ours(frame.filename)), len(frames))
    shown = traceback.format_list(frames[first_user:])
    head = ["Traceback (most recent call last):\n", *shown] if shown else []
    return "".join(head + traceback.format_exception_only(type(error), error)).rstrip()
