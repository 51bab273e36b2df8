"""How much host memory a process may still take, and a start-up check against it (--optimizer-cpu-offload puts
12 bytes per parameter in host memory: failing at start-up beats being killed at the first optimizer step)."""

from __future__ import annotations

from pathlib import Path


def available_host_memory() -> int | None:
    """Bytes this process may still allocate: Linux's MemAvailable, lowered to the room left under a cgroup's
    memory limit (a container's, v2 or v1) where there is one; None where neither is known."""
    candidates = [value for value in (_mem_available(), _cgroup_room()) if value is not None]
    return min(candidates) if candidates else None


def check_host_memory(needed: int, what: str, available: int | None) -> None:
    """Raise ``MemoryError`` naming ``what`` and the figures when ``needed`` bytes exceed ``available``."""
    if available is not None and needed > available:
        raise MemoryError(f"{what} need {needed / 2**30:.1f} GiB of host memory and {available / 2**30:.1f} GiB is "
                          "available: use a host with more memory, fewer trainer processes per host, or drop "
                          "--optimizer-cpu-offload")


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        root = Path("/sys/fs/cgroup")
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's near-2^63 "no limit"
            return max(int(limit) - usage, 0)
    return None
