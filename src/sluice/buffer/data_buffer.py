"""The Data Buffer: the one place that knows which prompt groups are waiting, generating, finished or trained.

Flow of a group (``group_id`` is assigned on first hand-out and kept for the group's whole life)::

    requeued (first), then PromptSource.next_batch
        │ get_prompt_groups                       (BufferFull past max_held_groups)
        ▼
    in flight ── requeue (aborted; partial tokens kept) ──► requeued
        │ put_finished                            (tags untagged samples with the hand-out version)
        ▼
    finished ── older than max_staleness: its prompt, fresh ──► requeued
        │ take_train_groups(num_groups, trainer_version)
        ▼
    trainer

Decisions, each tested in tests/test_buffer.py:
- **Staleness**: a group's policy version is the oldest weight version behind any of its tokens. A finished
  group with ``trainer_version - policy_version > max_staleness`` is not trained and not dropped: it is
  requeued as its original prompt (its tokens discarded, being off-policy beyond the bound), so every prompt
  of an epoch is still trained exactly once.
- **Order**: requeued groups (aborted, stale, or in flight at a ``state_dict``) are handed out before any new
  prompt, oldest first.
- **Memory**: at most ``max_held_groups`` groups are in flight or finished together. ``get_prompt_groups``
  refuses (``BufferFull``) to hand out past it, and ``put_finished`` refuses more finished groups than it; both
  raise rather than block, because a single-threaded caller (the sync loop, a Ray actor method) that blocked
  would wait on itself. A producer asks for ``num_free_slots`` groups at most.
- **Resume**: ``state_dict`` holds the source cursor and every group not yet trained; after
  ``load_state_dict`` the groups that were in flight are handed out again first (as they were handed out),
  so nothing is lost or generated twice into training.

Not thread-safe: one caller at a time (the Ray actor serialises calls; the local run has one thread).
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any, Protocol

from sluice.buffer.records import group_from_state, group_to_state, sample_from_state, sample_to_state
from sluice.types import Sample, SampleGroup

FORMAT = "sluice.data_buffer"
_STATE_VERSION = 1


class BufferFull(RuntimeError):
    """The buffer holds ``max_held_groups`` groups already; train (take_train_groups) before asking for more."""


class PromptBatches(Protocol):
    def next_batch(self, n: int) -> list[Sample]: ...


class DataBuffer:
    def __init__(self, source: PromptBatches, n_samples_per_prompt: int, max_staleness: int = 0,
                 max_held_groups: int = 1024) -> None:
        for name, value, least in (("n_samples_per_prompt", n_samples_per_prompt, 1),
                                   ("max_staleness", max_staleness, 0), ("max_held_groups", max_held_groups, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"DataBuffer: {name} must be an int >= {least}, got {value!r}")
        self.source = source
        self.n_samples_per_prompt = n_samples_per_prompt
        self.max_staleness = max_staleness
        self.max_held_groups = max_held_groups
        self.weight_version = 0  # of the newest weights pushed to the engines (set_weight_version)
        self.num_stale_requeued = 0  # finished groups regenerated for being too stale, over the run
        self.num_dropped = 0  # in-flight groups dropped by a dynamic filter, over the run
        self._next_group_id = 0
        self._requeued: deque[SampleGroup] = deque()  # waiting to be handed out again, before new prompts
        self._in_flight: dict[int, SampleGroup] = {}  # group_id -> a copy of the group as it was handed out
        self._handed_version: dict[int, int] = {}  # group_id -> weight version when handed out
        self._finished: deque[SampleGroup] = deque()  # generated and scored, waiting to be trained
        self._prompts: dict[int, Sample] = {}  # group_id -> its prompt, until trained: regenerates a stale group

    # ---- counts -----------------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def num_finished(self) -> int:
        return len(self._finished)

    @property
    def num_requeued(self) -> int:
        return len(self._requeued)

    @property
    def num_free_slots(self) -> int:
        """Groups that may still be handed out before the memory bound is reached."""
        return self.max_held_groups - self.num_in_flight - self.num_finished

    def counts(self) -> dict[str, int]:
        """The counts above in one call (what a producer asks a buffer actor for)."""
        return {"in_flight": self.num_in_flight, "finished": self.num_finished, "requeued": self.num_requeued,
                "free": self.num_free_slots, "stale_requeued": self.num_stale_requeued}

    # ---- rollout side ---------------------------------------------------------------------------------
    def get_prompt_groups(self, num_groups: int) -> list[SampleGroup]:
        """``num_groups`` groups to generate: requeued ones first (partial tokens kept), then new prompts
        (``n_samples_per_prompt`` copies each). They count as in flight until put_finished or requeue."""
        _check_count("num_groups", num_groups)
        if num_groups > self.num_free_slots:
            raise BufferFull(f"asked for {num_groups} prompt groups with {self.num_in_flight} in flight and "
                             f"{self.num_finished} finished of at most {self.max_held_groups}; train first")
        groups = [self._requeued.popleft() for _ in range(min(num_groups, len(self._requeued)))]
        if len(groups) < num_groups:
            groups += [self._new_group(prompt) for prompt in self.source.next_batch(num_groups - len(groups))]
        for group in groups:
            self._in_flight[group.group_id] = copy.deepcopy(group)  # the caller may fill the samples in place
            self._handed_version[group.group_id] = self.weight_version
        return groups

    def next_batch(self, n: int) -> list[Sample]:
        """``n`` prompt samples, not tracked: for rollouts that generate and finish within one call (dynamic
        sampling, --rollout-function-path). Requeued groups' prompts come first, so none is skipped."""
        _check_count("n", n)
        prompts = []
        while self._requeued and len(prompts) < n:
            prompts.append(self._prompts.pop(self._requeued.popleft().group_id))
        if len(prompts) < n:
            prompts += self.source.next_batch(n - len(prompts))
        return prompts

    def put_finished(self, groups: list[SampleGroup]) -> None:
        """Receive generated and scored groups. A sample without weight versions (a generate function that
        sets none) is tagged with the version current when its group was handed out."""
        self._check_in_flight(groups)
        if self.num_finished + len(groups) > self.max_held_groups:
            raise BufferFull(f"{len(groups)} finished groups do not fit: {self.num_finished} of at most "
                             f"{self.max_held_groups} are held already; take_train_groups first")
        for group in groups:
            version = self._handed_version.pop(group.group_id)
            del self._in_flight[group.group_id]
            for sample in group.samples:
                if not sample.weight_versions:
                    sample.weight_versions.append(version)
            self._finished.append(group)

    def requeue(self, groups: list[SampleGroup]) -> None:
        """Take back aborted or partial groups; they are handed out again, tokens as they are, before new prompts."""
        self._check_in_flight(groups)
        for group in groups:
            del self._in_flight[group.group_id]
            del self._handed_version[group.group_id]
            self._requeued.append(group)

    def drop(self, groups: list[SampleGroup]) -> None:
        """Let go of in-flight groups that will not be trained (a dynamic filter rejected them): their prompts
        count as used, as in a sync run's dynamic sampling."""
        self._check_in_flight(groups)
        for group in groups:
            del self._in_flight[group.group_id]
            del self._handed_version[group.group_id]
            del self._prompts[group.group_id]
        self.num_dropped += len(groups)

    def set_weight_version(self, version: int) -> None:
        """The engines now generate with weights ``version`` (called after every weight sync)."""
        self.weight_version = int(version)

    # ---- trainer side ---------------------------------------------------------------------------------
    def take_train_groups(self, num_groups: int, trainer_version: int) -> list[SampleGroup]:
        """Up to ``num_groups`` finished groups, oldest first, none older than ``max_staleness`` versions behind
        ``trainer_version``; staler ones are requeued as fresh prompts. May return fewer (not enough finished)."""
        _check_count("num_groups", num_groups)
        taken = []
        while self._finished and len(taken) < num_groups:
            group = self._finished.popleft()
            version = group.policy_version  # None only for an empty group: nothing in it can be stale
            if version is not None and trainer_version - version > self.max_staleness:
                self._requeued.append(self._new_group(self._prompts[group.group_id], group.group_id))
                self.num_stale_requeued += 1
            else:
                del self._prompts[group.group_id]
                taken.append(group)
        return taken

    # ---- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain dicts and lists: the source cursor and every group not trained yet. In-flight groups are saved
        as they were handed out and come back first after load_state_dict."""
        in_flight = [self._in_flight[group_id] for group_id in sorted(self._in_flight)]
        return {
            "format": FORMAT,
            "version": _STATE_VERSION,
            "source": self.source.state_dict() if hasattr(self.source, "state_dict") else None,
            "n_samples_per_prompt": self.n_samples_per_prompt,
            "weight_version": self.weight_version,
            "next_group_id": self._next_group_id,
            "num_stale_requeued": self.num_stale_requeued,
            "num_dropped": self.num_dropped,
            "requeued": [group_to_state(g) for g in [*in_flight, *self._requeued]],
            "finished": [group_to_state(g) for g in self._finished],
            "prompts": [[group_id, sample_to_state(p)] for group_id, p in sorted(self._prompts.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. A bare prompt-source state (a checkpoint from before the buffer existed)
        restores the cursor only: nothing was in flight then."""
        if state.get("format") != FORMAT:
            self._load_source(state)
            return
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data buffer state has version {state.get('version')!r}, expected {_STATE_VERSION}")
        if state.get("n_samples_per_prompt") != self.n_samples_per_prompt:
            raise ValueError(f"cannot resume the data buffer: saved with {state.get('n_samples_per_prompt')} "
                             f"samples per prompt, now {self.n_samples_per_prompt}")
        if state["source"] is not None:
            self._load_source(state["source"])
        self.weight_version = int(state["weight_version"])
        self._next_group_id = int(state["next_group_id"])
        self.num_stale_requeued = int(state["num_stale_requeued"])
        self.num_dropped = int(state.get("num_dropped", 0))
        self._requeued = deque(group_from_state(g) for g in state["requeued"])
        self._finished = deque(group_from_state(g) for g in state["finished"])
        self._prompts = {int(group_id): sample_from_state(p) for group_id, p in state["prompts"]}
        self._in_flight, self._handed_version = {}, {}

    # ---- internals ------------------------------------------------------------------------------------
    def _load_source(self, source_state: dict[str, Any]) -> None:
        if not hasattr(self.source, "load_state_dict"):
            raise ValueError("the saved run has a data cursor, but this data source has no load_state_dict")
        self.source.load_state_dict(source_state)

    def _new_group(self, prompt: Sample, group_id: int | None = None) -> SampleGroup:
        """A pending group of ``n_samples_per_prompt`` copies of ``prompt``; a new id unless ``group_id``."""
        if group_id is None:
            group_id, self._next_group_id = self._next_group_id, self._next_group_id + 1
            self._prompts[group_id] = copy.deepcopy(prompt)
        return SampleGroup([copy.deepcopy(prompt) for _ in range(self.n_samples_per_prompt)], group_id=group_id)

    def _check_in_flight(self, groups: list[SampleGroup]) -> None:
        """Refuse, before changing anything, a group this buffer did not hand out or already took back."""
        ids = [g.group_id for g in groups]
        unknown = [group_id for group_id in ids if group_id not in self._in_flight]
        if unknown or len(set(ids)) != len(ids):
            raise ValueError(f"groups {unknown or ids} are not in flight from this buffer (never handed out, "
                             "already returned, or returned twice in one call)")


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
