"""A weight version that arrives in several buckets, i.e. several ``/update_weights_from_distributed`` calls.

SGLang applies each call's tensors at once, so generation between two calls runs on half-new weights. With our
extension fields (``bucket_index``, ``num_buckets``, ``weight_version`` on every bucket), the server keeps the
buckets of a version here and applies them together in one ``LocalEngine.update_weights`` call when the last one
has arrived and passed its checks: one step-lock hold, one version stamp, one prefix-cache flush. Until then the
engine keeps generating on the old weights. The price is a second copy of the weights (on the device the group
receives into) while a version streams in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StagedUpdate:
    """Buckets received so far for one version through one weight group."""

    version: int
    num_buckets: int
    num_received: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # by HF name, views of the received buffers

    @property
    def complete(self) -> bool:
        return self.num_received == self.num_buckets


def stage_bucket(staged: dict[str, StagedUpdate], group_name: str, bucket_index: int, num_buckets: int,
                 version: int, tensors: dict[str, torch.Tensor]) -> StagedUpdate:
    """Add a received (and checked) bucket; bucket 0 starts a version afresh, dropping any unfinished one.

    Raises ValueError for a bucket that does not continue the version being staged (a lost or repeated call);
    that version is then dropped, so a half-received version can never be applied.
    """
    current = staged.get(group_name)
    if bucket_index == 0:
        current = staged[group_name] = StagedUpdate(version, num_buckets)
    elif current is None or (current.version, current.num_buckets, current.num_received) != \
            (version, num_buckets, bucket_index):
        staged.pop(group_name, None)
        expected = "bucket 0" if current is None else \
            f"bucket {current.num_received} of {current.num_buckets} for version {current.version}"
        raise ValueError(f"bucket {bucket_index} of {num_buckets} for version {version} arrived out of order "
                         f"(expected {expected}); the partial version was dropped")
    current.tensors.update(tensors)
    current.num_received += 1
    return current
