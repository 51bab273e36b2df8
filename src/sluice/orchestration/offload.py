"""--offload-train / --offload-rollout (--offload: both): colocated pools take turns on the shared devices.

Before each stage the loop hands the devices to it: "rollout" and "eval": the trainer moves to host memory;
"train": the engines free their KV cache and weights, the trainer comes back; "sync": the engines come back
(the trainer still holds its weights, which it sends). SFT from data reads its rollout from the data: its
"rollout" stage moves nothing (its engines, if any, only evaluate).
"""

from __future__ import annotations

from sluice.config.sections import ClusterConfig
from sluice.orchestration.pools import EnginePool, TrainerPool

# stage -> (engines on the device, trainer on the device), where offloading is asked for
_WANTED = {"train": (False, True), "sync": (True, True), "rollout": (True, False), "eval": (True, False)}


class OffloadTurns:
    def __init__(self, cluster: ClusterConfig, engines: EnginePool | None, trainer: TrainerPool | None,
                 rollout_uses_devices: bool = True) -> None:
        self.engines, self.trainer = engines, trainer
        self.rollout_uses_devices = rollout_uses_devices  # False for SFT from data: its rollout is read, not run
        self.offload_rollout = bool(cluster.offload or cluster.offload_rollout) and engines is not None
        self.offload_train = bool(cluster.offload or cluster.offload_train) and trainer is not None
        self._engines_on, self._trainer_on = True, True

    def memory_for(self, stage: str) -> None:
        """Move the pools as ``stage`` (rollout, eval, train or sync) needs; a no-op without --offload-*."""
        if stage == "rollout" and not self.rollout_uses_devices:
            return
        engines_on, trainer_on = _WANTED[stage]
        engines_on = engines_on or not self.offload_rollout
        trainer_on = trainer_on or not self.offload_train
        if engines_on != self._engines_on and self.offload_rollout:
            self.engines.onload() if engines_on else self.engines.offload()
            self._engines_on = engines_on
        if trainer_on != self._trainer_on and self.offload_train:
            self.trainer.onload() if trainer_on else self.trainer.offload()
            self._trainer_on = trainer_on
