"""Checkpoint directories: atomic writes, `latest`, re-saving a step, RNG capture."""

from __future__ import annotations

import torch

from sluice.checkpoint.store import (
    capture_rng_state,
    find_latest,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from sluice.config import AlgorithmConfig, TrainConfig
from sluice.trainer.torch_backend import TorchTrainer


def make_trainer(checkpoint: str) -> TorchTrainer:
    return TorchTrainer(checkpoint, TrainConfig(train_device="cpu"), AlgorithmConfig(), temperature=1.0)


def test_resaving_a_step_replaces_it_and_leaves_no_staging_dirs(small_checkpoint, tmp_path):
    trainer = make_trainer(small_checkpoint)
    save_checkpoint(tmp_path, 3, trainer, {"note": "first"})
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    path = save_checkpoint(tmp_path, 3, trainer, {"note": "second"})
    assert find_latest(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "rollout_000003"]
    restored = make_trainer(small_checkpoint)
    state = load_checkpoint(path, restored)
    assert state == {"rollout_id": 3, "note": "second"}
    for (name, saved), (_, loaded) in zip(trainer.model.named_parameters(), restored.model.named_parameters()):
        assert torch.equal(saved, loaded), name


def test_rng_state_round_trip_replays_the_same_draws():
    torch.manual_seed(7)
    state = capture_rng_state()
    first = torch.rand(5)
    torch.manual_seed(8)
    restore_rng_state(state)
    assert torch.equal(torch.rand(5), first)
