"""Building the run's parts from the config and placing them: in this process (local_pools.py) or as Ray actor
pools (ray_placement.py, ray_pools.py, ray_actors.py), behind the typed interfaces of pools.py.

``build_run(config, log)`` (builder.py) returns the ``Run`` (run.py) that ``loops.train`` drives. Imported on first
use, so that a Ray actor importing one module here does not pull in the whole run.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_run"]


def __getattr__(name: str) -> Any:
    if name == "build_run":
        from sluice.orchestration.builder import build_run

        return build_run
    raise AttributeError(f"module 'sluice.orchestration' has no attribute {name!r}")
