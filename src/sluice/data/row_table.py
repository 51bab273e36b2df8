"""The rows a data spec selects (``path`` or ``path@[a:b]``), read at any positions, for shuffled prompt order.

Opening a table counts the rows of each shard (parquet footers and Arrow headers hold the count; a jsonl shard
is indexed in one pass, 8 bytes per row, which for a compressed one also keeps the decompressed spans in the
block cache), and holds no rows. Shards wholly past a slice's end are not opened, and the shard the slice ends in
is indexed only up to its last row. ``rows_at`` then reads just the rows asked
for, each shard once per call, so a batch of shuffled positions costs a seek per jsonl row or a cached block per
parquet row group; see ``shards.py``.

Positions are 0-based indices into the selection (a slice's first row is position 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sluice.data.block_cache import BlockCache
from sluice.data.containers import shards_of
from sluice.data.files import empty_slice_error, no_rows_error, parse_spec
from sluice.data.rows import LocatedRow
from sluice.data.shards import Shard


class RowTable:
    def __init__(self, spec: str, cache: BlockCache | None = None) -> None:
        path, cut = parse_spec(spec)
        self.spec = spec
        self.cache = cache if cache is not None else BlockCache()
        shards = shards_of(path)
        counts = _counts_up_to(shards, _known_stop(cut), self.cache)
        self.shards = shards[:len(counts)]  # shards wholly past the slice are never opened
        total = sum(counts)
        selected = range(total)[cut] if cut is not None else range(total)
        if not selected:
            total = sum(shard.num_rows() for shard in shards)  # the message names the whole count
            raise no_rows_error(path, shards) if total == 0 else empty_slice_error(path, cut, total)
        self._first = selected.start  # the selection's first row, as a position in all the shards' rows
        self.num_rows = len(selected)
        self._shard_starts = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))[:-1]

    def __len__(self) -> int:
        return self.num_rows

    def rows_at(self, positions: Sequence[int]) -> list[LocatedRow]:
        """The rows at ``positions`` (any order, repeats allowed), in the order asked."""
        asked = np.asarray(positions, dtype=np.int64)
        if len(asked) and (asked.min() < 0 or asked.max() >= self.num_rows):
            raise IndexError(f"{self.spec}: positions must lie in [0, {self.num_rows}), "
                             f"got {asked.min()} to {asked.max()}")
        distinct, back = np.unique(asked + self._first, return_inverse=True)  # ascending: sequential reads
        owners = np.searchsorted(self._shard_starts, distinct, side="right") - 1
        found: list[LocatedRow] = []
        for owner in np.unique(owners):
            local = distinct[owners == owner] - self._shard_starts[owner]
            found += self.shards[owner].rows_at(local, self.cache)
        return [found[i] for i in back]


def _known_stop(cut: slice | None) -> int | None:
    """Where a slice ends without knowing the row count (None: at the end, or counted from it)."""
    if cut is None or cut.stop is None or cut.stop < 0 or (cut.start or 0) < 0:
        return None
    return cut.stop


def _counts_up_to(shards: list[Shard], stop: int | None, cache: BlockCache) -> list[int]:
    """Row counts of the shards, in order, up to the first one that reaches row ``stop`` (None: all); that last
    one is counted only up to row ``stop``, which is all the selection holds of it."""
    counts: list[int] = []
    for shard in shards:
        if stop is not None and sum(counts) >= stop:
            break
        counts.append(shard.count_rows_up_to(None if stop is None else stop - sum(counts), cache))
    return counts
