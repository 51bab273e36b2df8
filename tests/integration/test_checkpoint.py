"""Checkpoint directories: atomic writes (a crash mid-save keeps the previous one), `latest`, re-saving a step,
keeping the last N, RNG capture, HF export, resume compatibility and debug rollout data."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sluice.checkpoint.compat import changed_settings, resume_mismatches
from sluice.checkpoint.hf_export import export_hf, hf_export_path
from sluice.checkpoint.store import (
    capture_rng_state,
    find_latest,
    list_checkpoints,
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


# ---- crashes during a save ------------------------------------------------------------------------------

CRASHING_SAVE = """
import os, resource, signal, sys
import torch
from sluice.checkpoint.store import save_checkpoint
from sluice.config import AlgorithmConfig, TrainConfig
from sluice.trainer.torch_backend import TorchTrainer

model, root = sys.argv[1], sys.argv[2]
trainer = TorchTrainer(model, TrainConfig(train_device="cpu"), AlgorithmConfig(), temperature=1.0)
save_checkpoint(root, 0, trainer, {"note": "first"})
with torch.no_grad():
    next(trainer.model.parameters()).add_(1.0)

# 1. A real failing write: files may not grow past 64 KiB (EFBIG instead of the SIGXFSZ kill).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
try:
    save_checkpoint(root, 1, trainer, {"note": "second"})
except BaseException as error:
    print("write failed:", type(error).__name__, error, flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print("left behind:", sorted(os.listdir(root)), flush=True)

# 2. Killed in the middle of the next attempt, right after trainer.pt lands in the staging directory.
def die(part):
    if part == "trainer.pt":
        os.kill(os.getpid(), signal.SIGKILL)
save_checkpoint(root, 1, trainer, {"note": "second"}, after_write=die)
print("not reached", flush=True)
"""


def test_a_failed_write_and_a_kill_mid_save_leave_the_previous_checkpoint(small_checkpoint, tmp_path):
    """A real subprocess: one save fails on a real write error (file size limit), the next is SIGKILLed
    between two files; `latest` still names the first checkpoint, which loads, and the next save cleans up."""
    root = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", CRASHING_SAVE, small_checkpoint, str(root)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "write failed:" in proc.stdout  # the size limit hit torch.save of trainer.pt
    assert "left behind: ['latest', 'rollout_000000']" in proc.stdout  # the failed save removed its staging dir
    assert "not reached" not in proc.stdout
    assert find_latest(root) == root / "rollout_000000"
    assert (root / ".rollout_000001.tmp" / "trainer.pt").exists()  # the kill left a half-written staging dir
    assert not (root / "rollout_000001").exists()

    restored = make_trainer(small_checkpoint)
    assert load_checkpoint(find_latest(root), restored) == {"rollout_id": 0, "note": "first"}
    original = make_trainer(small_checkpoint)  # the first save had the initial weights
    for (name, a), (_, b) in zip(original.model.named_parameters(), restored.model.named_parameters()):
        assert torch.equal(a, b), name

    save_checkpoint(root, 1, restored, {"note": "again"})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "rollout_000000", "rollout_000001"]


def test_a_crash_between_the_renames_of_a_resave_is_recovered(small_checkpoint, tmp_path):
    trainer = make_trainer(small_checkpoint)
    path = save_checkpoint(tmp_path, 2, trainer, {"note": "kept"})
    os.replace(path, tmp_path / ".rollout_000002.old")  # where a re-save stops if killed between its renames
    assert find_latest(tmp_path) == path
    assert load_checkpoint(path, make_trainer(small_checkpoint))["note"] == "kept"


def test_keep_last_deletes_the_oldest_and_no_save_optim_leaves_the_moments_out(small_checkpoint, tmp_path):
    trainer = make_trainer(small_checkpoint)
    for rollout_id in range(4):
        save_checkpoint(tmp_path, rollout_id, trainer, {}, keep_last=2, with_optimizer=rollout_id != 3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["rollout_000002", "rollout_000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "rollout_000002", "rollout_000003"]
    assert torch.load(tmp_path / "rollout_000002" / "trainer.pt", weights_only=False)["optimizer"] is not None
    assert torch.load(tmp_path / "rollout_000003" / "trainer.pt", weights_only=False)["optimizer"] is None
    restored = make_trainer(small_checkpoint)
    load_checkpoint(tmp_path / "rollout_000003", restored)  # loads; the optimizer keeps its fresh state
    assert restored.optimizer.state_dict()["state"] == {}


# ---- HF export -----------------------------------------------------------------------------------------


def test_hf_export_round_trip_is_bit_exact_in_transformers_and_the_engine(small_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sluice.config import EngineConfig
    from sluice.engine.local_engine import LocalEngine

    trainer = make_trainer(small_checkpoint)
    with torch.no_grad():  # weights no checkpoint on disk has, with full-precision noise in every bit
        for param in trainer.model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 1e-3)
    tokenizer = AutoTokenizer.from_pretrained(small_checkpoint)
    out = export_hf(trainer.model, tokenizer, tmp_path / "hf_5")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    expected = trainer.named_weights()

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "a: say 7"
    assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template

    engine = LocalEngine(str(out), EngineConfig(device="cpu"))
    try:
        weights = engine.named_weights()
        assert set(expected) - set(weights) == {"lm_head.weight"}  # tied to the embedding: the engine shares it
        for name, value in weights.items():
            assert torch.equal(value, expected[name]), name
    finally:
        engine.shutdown()
    assert hf_export_path("out/hf_{rollout_id}", 12) == Path("out/hf_12")


# ---- resume compatibility, rollout data ----------------------------------------------------------------


def test_resume_mismatches_name_each_field_and_allow_tuning_changes():
    saved = {"rollout_batch_size": 8, "n_samples_per_prompt": 4, "global_batch_size": None, "lr": 1e-6,
             "advantage_estimator": "grpo", "prompt_data": "a.jsonl", "run_dir": "runs/a"}
    now = {**saved, "global_batch_size": 32, "lr": 2e-6, "run_dir": "runs/b"}  # 32 = 8 x 4, the derived default
    shape = {"hidden_size": 32, "num_hidden_layers": 2}
    assert resume_mismatches(saved, now, shape, dict(shape)) == []
    assert changed_settings(saved, now) == ["--lr: 1e-06 -> 2e-06"]  # run paths are not news
    changed = {**saved, "rollout_batch_size": 4, "advantage_estimator": "gspo"}  # derived global batch: 16
    problems = resume_mismatches(saved, changed, shape, {**shape, "hidden_size": 64})
    assert problems == [
        "--rollout-batch-size: saved 8, now 4",
        "--global-batch-size: saved 32, now 16",
        "--advantage-estimator: saved 'grpo', now 'gspo'",
        "model hidden_size (--hf-checkpoint): saved 32, now 64",
    ]


def test_rollout_data_round_trip_keeps_every_field_exactly(tmp_path):
    from sluice.checkpoint.rollout_data import load_rollout_data, save_rollout_data
    from sluice.types import Sample, SampleGroup, Status

    sample = Sample(prompt=[{"role": "user", "content": "hi"}], group_index=1, index=9, prompt_tokens=[1, 2],
                    tokens=[1, 2, 3], response="x", response_length=1, label="7", reward={"acc": 0.1 + 0.2},
                    loss_mask=[1], rollout_log_probs=[-0.123456789012345678], weight_versions=[4],
                    status=Status.TRUNCATED, metadata={"n": np.int64(3), "nan": float("nan")})
    path = save_rollout_data(tmp_path / "r_4.json", 4, [SampleGroup([sample])])
    (group,) = load_rollout_data(path, rollout_id=4)
    (loaded,) = group.samples
    assert loaded.status is Status.TRUNCATED and loaded.metadata["n"] == 3 and math.isnan(loaded.metadata["nan"])
    loaded.metadata["nan"] = sample.metadata["nan"]  # NaN != NaN: compare the rest field by field
    assert dataclasses.asdict(loaded) == dataclasses.asdict(sample)
    with pytest.raises(ValueError, match="holds rollout 4, expected rollout 5"):
        load_rollout_data(path, rollout_id=5)
