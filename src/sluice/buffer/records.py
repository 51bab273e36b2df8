"""Sample groups as plain dicts and lists, for the Data Buffer's ``state_dict`` (a checkpoint, or a Ray call).

Every ``Sample`` field is kept (tokens, logprobs, weight versions, status, metadata), so a partial group saved
mid-flight comes back with the tokens it had and can be resumed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sluice.types import Sample, SampleGroup, Status

_SAMPLE_FIELDS = {f.name for f in dataclasses.fields(Sample)}


def sample_to_state(sample: Sample) -> dict[str, Any]:
    state = dataclasses.asdict(sample)
    state["status"] = sample.status.value
    return state


def sample_from_state(state: dict[str, Any]) -> Sample:
    unknown = sorted(set(state) - _SAMPLE_FIELDS)
    if unknown:
        raise ValueError(f"data buffer state: unknown sample fields {unknown}")
    return Sample(**{**state, "status": Status(state.get("status", Status.PENDING.value))})


def group_to_state(group: SampleGroup) -> dict[str, Any]:
    return {"group_id": group.group_id, "samples": [sample_to_state(s) for s in group.samples]}


def group_from_state(state: dict[str, Any]) -> SampleGroup:
    return SampleGroup([sample_from_state(s) for s in state["samples"]], group_id=int(state["group_id"]))
