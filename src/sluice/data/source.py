"""An epoch-aware, resumable cursor over the prompt samples.

The order of epoch ``e`` is a pure function of ``(seed, e)`` (``random.Random(seed + e)`` shuffles the
indices; unshuffled is file order), so the whole state is one number, ``num_consumed``: a resumed run rebuilds
the same permutation and hands out exactly the prompts the interrupted run would have handed out next.
"""

from __future__ import annotations

import copy
import random
from typing import Any

from sluice.types import Sample

_STATE_VERSION = 1


class PromptSource:
    """Hands out prompts in batches, wrapping into a freshly ordered epoch when the current one runs out.

    ``epoch`` is the epoch the next prompt comes from, i.e. always ``num_consumed // num_prompts``: it
    advances as soon as the last prompt of an epoch has been handed out.
    """

    def __init__(self, samples: list[Sample], shuffle: bool, seed: int) -> None:
        if not samples:
            raise ValueError("PromptSource needs at least one prompt sample")
        self._samples = list(samples)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_consumed = 0
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def num_prompts(self) -> int:
        return len(self._samples)

    @property
    def epoch(self) -> int:
        return self.num_consumed // self.num_prompts

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices into the samples in the order epoch ``epoch`` hands them out."""
        order = list(range(self.num_prompts))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:  # one permutation per epoch, not one per batch
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        return self._order

    def next_batch(self, n: int) -> list[Sample]:
        """The next ``n`` prompts, as deep copies so callers may fill in responses without touching the pool.

        ``n`` may exceed the number of prompts; the batch then spans several epochs.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"batch size must be a positive int, got {n!r}")
        batch = []
        for _ in range(n):
            epoch, position = divmod(self.num_consumed, self.num_prompts)
            batch.append(copy.deepcopy(self._samples[self._order_of(epoch)[position]]))
            self.num_consumed += 1
        return batch

    def num_rollouts_for_epochs(self, num_epoch: int, batch_size: int) -> int:
        """Rollout steps needed to hand out every prompt ``num_epoch`` times.

        Rounded up (ceil): the last step may reach into the next epoch, rather than leaving prompts unseen.
        """
        if num_epoch <= 0 or batch_size <= 0:
            raise ValueError(f"num_epoch and batch_size must be positive, got {num_epoch} and {batch_size}")
        return -(-num_epoch * self.num_prompts // batch_size)

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
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"prompt source state has version {state.get('version')!r}, expected {_STATE_VERSION}")
        expected = {"num_prompts": self.num_prompts, "shuffle": self.shuffle, "seed": self.seed}
        mismatched = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
        if mismatched:
            details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items())
            raise ValueError(f"cannot resume the prompt source: the data or its settings changed ({details})")
        consumed = state.get("num_consumed")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"prompt source state has an invalid num_consumed {consumed!r}")
        self.num_consumed = consumed
