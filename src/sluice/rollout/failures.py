"""The failure budget of a rollout: failed samples are dropped from training until too many fail.

A sample fails when its generate or reward function raised or timed out (each is logged with the sample's id
as it happens). A few failures are noise the run can absorb; when more than ``--max-failed-sample-ratio`` of a
step's samples failed, something systematic is wrong (a dead reward service, a broken plug-in) and training
on the rest would hide it, so the run stops with the first errors.
"""

from __future__ import annotations

from sluice.types import SampleGroup, Status

NUM_ERRORS_SHOWN = 3


class RolloutFailed(RuntimeError):
    """Too many samples of a rollout failed; the message says how many and shows the first errors."""


def check_failure_budget(groups: list[SampleGroup], max_failed_ratio: float) -> None:
    """Raise RolloutFailed when more than ``max_failed_ratio`` of the samples failed (1.0: never)."""
    samples = [s for g in groups for s in g.samples]
    failed = [s for s in samples if s.status == Status.FAILED]
    if not samples or len(failed) <= max_failed_ratio * len(samples):
        return
    errors = [f"sample {s.index}: " + (s.metadata.get("reward_error") or s.metadata.get("generate_error")
                                       or "no error recorded") for s in failed[:NUM_ERRORS_SHOWN]]
    raise RolloutFailed(f"{len(failed)} of {len(samples)} samples of the rollout failed, more than "
                        f"--max-failed-sample-ratio {max_failed_ratio:g}; first errors:\n  " + "\n  ".join(errors))
