"""The engine's step counters, for /get_server_info and `sluice bench rollout`."""

from __future__ import annotations


class EngineStats:
    """Counters for /get_server_info and benchmarks: steps, tokens, time in forward passes."""

    def __init__(self):
        self.num_steps = 0
        self.num_decode_steps = 0
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0
        self.forward_seconds = 0.0  # whole steps: the three parts below
        self.decode_seconds = 0.0
        self.launch_seconds = 0.0
        self.sync_seconds = 0.0
        self.bookkeeping_seconds = 0.0

    def record(self, batch, launch_s: float, sync_s: float, bookkeeping_s: float) -> None:
        """``launch_s``: input preparation and kernel launches; ``sync_s``: sampling and waiting for the device;
        ``bookkeeping_s``: appending tokens, stop checks, prefix-cache registration."""
        seconds = launch_s + sync_s + bookkeeping_s
        self.num_steps += 1
        if batch.is_decode:
            self.num_decode_steps += 1
            self.num_decode_tokens += batch.num_tokens
            self.decode_seconds += seconds
        else:
            self.num_prefill_tokens += batch.num_tokens
        self.forward_seconds += seconds
        self.launch_seconds += launch_s
        self.sync_seconds += sync_s
        self.bookkeeping_seconds += bookkeeping_s
