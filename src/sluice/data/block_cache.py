"""A least-recently-used cache of decoded blocks of data files, bounded by their size in bytes.

A block is what a format can only read whole: a parquet row group, a mapped Arrow file, a span of a
compressed jsonl text. Shuffled reads touch blocks in no particular order, so keeping the recent ones decoded
saves decoding a block once per batch; the bound keeps a large dataset from ending up decoded in memory whole.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

DEFAULT_MAX_BYTES = 1 << 30


class BlockCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"BlockCache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.num_loads = 0  # blocks decoded over the cache's life, for tests and measurements
        self._blocks: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable, load: Callable[[], tuple[Any, int]]) -> Any:
        """The block under ``key``; ``load()`` returns (block, its size in bytes) when it is not cached.

        The block just asked for is always kept, even past the bound, since the caller is about to read it;
        older blocks are dropped until the rest fits.
        """
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key][0]
        block, size = load()
        self.num_loads += 1
        self._blocks[key] = (block, size)
        self.num_bytes += size
        while self.num_bytes > self.max_bytes and len(self._blocks) > 1:
            _, (_, dropped) = self._blocks.popitem(last=False)
            self.num_bytes -= dropped
        return block

    def __getstate__(self) -> dict[str, Any]:
        # A copy (a prompt source sent to a Ray actor) starts empty: decoded blocks, memory maps included, are
        # cheaper to read again where they are used than to send.
        return {**self.__dict__, "_blocks": OrderedDict(), "num_bytes": 0}

    def clear(self) -> None:
        self._blocks.clear()
        self.num_bytes = 0
