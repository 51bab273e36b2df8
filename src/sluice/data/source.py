"""An epoch-aware, resumable cursor over the prompts, by row position.

The order of epoch ``e`` is a pure function of ``(seed, e)``: a seeded permutation of all the row positions
(``epoch_permutation``; unshuffled is file order), so the whole state is one number,
``num_consumed``, and a resumed run rebuilds the same permutation and hands out exactly the prompts the
interrupted run would have handed out next, mid-epoch included.

Why one permutation over all rows rather than shuffling shards and then rows within them: every order is equally
likely, as with the whole dataset in memory; the order does not depend on how the rows are split into shards (the
same rows as one jsonl or as parquet shards come out identically); and it costs 4 bytes per row (8 past 2**31
rows), 40 MB for 10M rows, held, and 16 bytes per row while an epoch's order is drawn. Reading scattered rows is what ``row_table.py`` makes cheap.

A prompt over --rollout-max-prompt-len that a streamed table finds only when drawn (``prompt_table.py``) is
skipped: its position is consumed and the next one is drawn in its place.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import numpy as np

from sluice.types import Sample

_STATE_VERSION = 2  # version 1: Python's random.shuffle order over the prompts kept by the length filter


class Prompts(Protocol):
    """Prompt samples by position (``PromptTable``, or a list through ``SampleList``)."""

    num_usable: int  # prompts an epoch hands out (a bound where not yet known)

    @property
    def num_rows(self) -> int: ...

    def samples_at(self, positions: list[int]) -> list[Sample | None]: ...

    def no_usable_prompt_error(self) -> Exception: ...


class SampleList:
    """Samples already in memory (tests, and sources built from lists) as ``Prompts``."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = list(samples)
        self.num_usable = len(self.samples)

    @property
    def num_rows(self) -> int:
        return len(self.samples)

    def samples_at(self, positions: list[int]) -> list[Sample | None]:
        return [self.samples[p] for p in positions]

    def no_usable_prompt_error(self) -> Exception:  # not reached: samples_at never gives None here
        return ValueError("a list of samples has no prompt to hand out")


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Row positions in the order epoch ``epoch`` hands them out when shuffled.

    The positions sorted by random 64-bit keys, PCG64's raw output: numpy keeps the raw streams of its bit
    generators stable across releases, but not the algorithms of ``Generator`` methods such as ``shuffle``, and a
    resume after a numpy upgrade must rebuild the same order.
    """
    keys = np.random.PCG64([seed % 2**64, epoch]).random_raw(num_rows)
    return np.argsort(keys, kind="stable").astype(np.int32 if num_rows < 2**31 else np.int64)


class PromptSource:
    """Hands out prompts in batches, wrapping into a freshly ordered epoch when the current one runs out.

    ``epoch`` is the epoch the next prompt comes from, i.e. always ``num_consumed // num_prompts``: it
    advances as soon as the last position of an epoch has been handed out. ``num_prompts`` counts rows.
    """

    def __init__(self, prompts: list[Sample] | Prompts, shuffle: bool, seed: int) -> None:
        self._prompts = SampleList(prompts) if isinstance(prompts, list) else prompts
        if not self._prompts.num_rows:
            raise ValueError("PromptSource needs at least one prompt sample")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_consumed = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    @property
    def num_prompts(self) -> int:
        return self._prompts.num_rows

    @property
    def epoch(self) -> int:
        return self.num_consumed // self.num_prompts

    def _position(self, index: int) -> int:
        """The row position handed out ``index``-th over the run."""
        epoch, offset = divmod(index, self.num_prompts)
        if not self.shuffle:
            return offset
        if epoch != self._order_epoch:  # one permutation per epoch, not one per batch
            self._order, self._order_epoch = epoch_permutation(self.num_prompts, self.seed, epoch), epoch
        return int(self._order[offset])

    def next_batch(self, n: int) -> list[Sample]:
        """The next ``n`` prompts, as deep copies so callers may fill in responses without touching the pool.

        ``n`` may exceed the number of prompts; the batch then spans several epochs.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"batch size must be a positive int, got {n!r}")
        batch: list[Sample] = []
        num_skipped_in_a_row = 0
        while len(batch) < n:
            wanted = n - len(batch)
            positions = [self._position(self.num_consumed + i) for i in range(wanted)]
            for sample in self._prompts.samples_at(positions):
                self.num_consumed += 1
                if sample is not None:
                    batch.append(copy.deepcopy(sample))
                    num_skipped_in_a_row = 0
                    continue
                num_skipped_in_a_row += 1
                if num_skipped_in_a_row >= self.num_prompts:
                    raise self._prompts.no_usable_prompt_error()
        return batch

    def num_rollouts_for_epochs(self, num_epoch: int, batch_size: int) -> int:
        """Rollout steps needed to hand out every prompt ``num_epoch`` times.

        Rounded up (ceil): the last step may reach into the next epoch, rather than leaving prompts unseen.
        """
        if num_epoch <= 0 or batch_size <= 0:
            raise ValueError(f"num_epoch and batch_size must be positive, got {num_epoch} and {batch_size}")
        return -(-num_epoch * self._prompts.num_usable // batch_size)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; ``epoch`` is informational, ``num_consumed`` is what is restored."""
        return {
            "version": _STATE_VERSION,
            "num_consumed": self.num_consumed,
            "epoch": self.epoch,
            "num_prompts": self.num_prompts,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; refuses a state from different data or shuffle settings,
        because the same position would then name different prompts and the resume would not be exact."""
        version = state.get("version")
        if version == 1 and (state.get("shuffle") or state.get("num_prompts") != self._prompts.num_usable):
            # Version 1 counted only the prompts the length filter kept, in Python's shuffle order: a position
            # then names the same row only unshuffled and with nothing dropped.
            raise ValueError("the prompt cursor was saved by an earlier sluice whose shuffled order (or count of "
                             "prompts dropped by --rollout-max-prompt-len) differs; it cannot continue at the same "
                             "row; start the data from its beginning (a fresh --save directory)")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"prompt source state has version {version!r}, expected {_STATE_VERSION}")
        expected = {"num_prompts": self.num_prompts, "shuffle": self.shuffle, "seed": self.seed}
        mismatched = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
        if mismatched:
            details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items())
            raise ValueError(f"cannot resume the prompt source: the data or its settings changed ({details})")
        consumed = state.get("num_consumed")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"prompt source state has an invalid num_consumed {consumed!r}")
        self.num_consumed = consumed
