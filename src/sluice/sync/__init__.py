"""Weight sync trainer -> engines, tagged with the policy version: one interface (``WeightSync``), three methods.

- ``InProcessSync`` (in_process.py): the engine lives in the trainer's process; it copies the trainer's tensors.
- ``BroadcastSync`` (broadcast.py): engine servers join a process group hosted by the trainer's rank 0; buckets of
  weights are broadcast (NCCL or gloo), and the engines apply a version once all its buckets arrived.
- ``DiskSync`` (disk.py): safetensors written atomically under a directory; the engines load them.

Every push carries the version and per-tensor checksums the engine checks before the weights become visible;
every wait is bounded by ``--update-weights-timeout``. ``make_weight_sync`` (factory.py) builds the one the
config names. docs/weight_sync.md has the whole story.
"""

from sluice.sync.interface import EngineResult, SyncReport, WeightSync, WeightSyncError

__all__ = ["EngineResult", "SyncReport", "WeightSync", "WeightSyncError"]
