"""The sampling seed of every engine request of a run: a pure function of where the request sits in the run.

    seed = H(--rollout-seed, stream, Sample.index)          the sample's seed (turn 0)
    turn seed = H(sample's seed, "turn", turn)             turns 1, 2, ... of a multi-turn or agent sample

The engine draws a seeded row's noise from (seed, position of the token), so a sample's tokens depend on its
seed, its context and the weights, never on which requests shared its batches or on when it was aborted.

What the parts are, and why:
- ``stream`` names the family of requests: ``train`` for training rollouts, whose ``Sample.index`` is unique in
  the run (the buffer numbers it ``group_id * n_samples_per_prompt + k``; a group keeps its id when it is
  requeued, continued from a partial rollout, or saved and resumed); ``train/dynamic/<first index>/<round>`` for
  DAPO dynamic sampling, whose rounds number their samples from 0 again; ``train/rollout-function/<step>`` for
  a --rollout-function-path, which may generate past its step's indices; ``eval/<set name>`` for evaluation,
  whose indices restart at every evaluation: each evaluation draws the same noise for the same prompt, so its
  changes from one evaluation to the next come from the weights (common random numbers).
- No rollout id: a partial rollout is continued in a later step than the one it started in, and in the async
  loop the step a sample lands in depends on timing; both must keep the sample's seed.
- The turn: a later turn starts at a later position anyway, but an agent may send a re-rendered history whose
  positions overlap an earlier turn's; a seed per turn keeps their noise apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from sluice.types import SamplingParams

TRAIN_STREAM = "train"


@dataclass(frozen=True)
class RolloutSeeds:
    """Derives request seeds for one family of requests (``stream``) from the run's --rollout-seed."""

    base: int  # --rollout-seed
    stream: str = TRAIN_STREAM

    def within(self, stream: str) -> RolloutSeeds:
        return dataclasses.replace(self, stream=stream)

    def params_for(self, params: SamplingParams, sample_index: int) -> SamplingParams:
        """``params`` with the seed of sample ``sample_index``. A seed already in ``params`` (set by a rollout or
        eval function) takes the place of --rollout-seed as the base, so the samples of a group still differ."""
        base = self.base if params.seed is None else params.seed
        return dataclasses.replace(params, seed=derive_seed(base, self.stream, sample_index))


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (fits a signed int64, SGLang's ``sampling_seed`` and torch's generators);
    blake2b, so that it is the same in every process and Python version (``hash()`` of a str is salted)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def turn_seed(seed: int | None, turn: int) -> int | None:
    """The seed of turn ``turn`` (from 0) of a sample seeded ``seed``: turn 0 keeps it, as a single-turn call would.
    Also for any further engine call of one sample that must not repeat the first (a retry, a second answer):
    the same seed from the same context draws the same tokens."""
    if seed is None or turn == 0:
        return seed
    return derive_seed(seed, "turn", turn)
