"""Engines behind real HTTP servers on 127.0.0.1, in threads of the test process."""

from __future__ import annotations

import socket

from sluice.config import EngineConfig
from sluice.engine.server.app import BackgroundServer
from sluice.engine.server.context import ServerContext

CPU = EngineConfig(device="cpu", dtype="float32")


def start_server(engine, checkpoint: str, port: int = 0) -> BackgroundServer:
    return BackgroundServer(ServerContext(engine, checkpoint, "lively", CPU), port=port).start()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now. The probes stay bound until all are chosen: a port probed and released
    can be the very one the kernel hands to the next probe."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
