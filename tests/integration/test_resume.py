"""A whole run survives SIGKILL: `sluice train` killed mid-run and relaunched with --load continues exactly like
an uninterrupted run. Plus: incompatible checkpoints are refused by name; --save-hf, --keep-checkpoints and
--no-save-optim in a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.checkpoint.rollout_data import load_rollout_data
from sluice.config import ConfigError, EngineConfig, parse_config, validate
from sluice.demo.model import TinyModelShape, build_checkpoint
from sluice.engine.local_engine import LocalEngine
from sluice.observability.metrics import read_metrics
from sluice.orchestration import build_run
from helpers.train_loop import N_SAMPLES, ROLLOUT_BATCH, flags, run_loop
from helpers.train_process import kill_after_first_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

NUM_ROLLOUT = 8


def rollouts(template_dir: Path) -> dict[int, list]:
    """The debug rollout data of each rollout id: the groups trained at that step."""
    return {int(p.stem.split("_")[1]): load_rollout_data(p) for p in sorted(template_dir.glob("r_*.json"))}


def test_sigkill_mid_run_and_relaunch_matches_an_uninterrupted_run(say7, tmp_path):
    root, model, data = say7

    def argv(name: str) -> list[str]:
        save = tmp_path / name / "ckpt"  # --load is --save: the same command line is simply relaunched
        rollout_data = str(tmp_path / name / "data" / "r_{rollout_id}.json")
        return flags(model, data, tmp_path / name / "run", save, NUM_ROLLOUT, "--save-interval", "2",
                     "--load", str(save), "--save-debug-rollout-data", rollout_data)

    straight = run_loop(argv("straight"))
    killed_at = kill_after_first_checkpoint(argv("killed"), tmp_path / "killed" / "ckpt")
    resumed = run_loop(argv("killed"))  # the relaunch
    resumed_from = int(killed_at.split("_")[1]) + 1
    assert resumed.schedule.start_rollout >= resumed_from  # a later checkpoint may have landed before the kill
    assert resumed.schedule.start_rollout < NUM_ROLLOUT

    # Same prompts in the same order, the same samples, each rollout once.
    expected, got = rollouts(tmp_path / "straight" / "data"), rollouts(tmp_path / "killed" / "data")
    assert sorted(got) == sorted(expected) == list(range(NUM_ROLLOUT))
    for rollout_id in range(NUM_ROLLOUT):
        assert [g.prompt for g in got[rollout_id]] == [g.prompt for g in expected[rollout_id]], rollout_id
        assert [[s.tokens for s in g.samples] for g in got[rollout_id]] == \
            [[s.tokens for s in g.samples] for g in expected[rollout_id]], rollout_id
    indices = [s.index for groups in got.values() for g in groups for s in g.samples]
    assert sorted(indices) == list(range(NUM_ROLLOUT * ROLLOUT_BATCH * N_SAMPLES))  # none lost, none twice

    # One metrics record per step (the killed run's steps past its checkpoint were dropped), same values.
    def by_step(name: str) -> dict[int, dict]:
        return {r["step"]: r for r in read_metrics(tmp_path / name / "run")}

    records, straight_records = by_step("killed"), by_step("straight")
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "run")] == list(range(1, NUM_ROLLOUT + 1))
    for step in range(1, NUM_ROLLOUT + 1):
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm"):
            assert records[step][key] == straight_records[step][key], (step, key)
    assert resumed.trainer.backend.num_optimizer_steps == straight.trainer.backend.num_optimizer_steps == NUM_ROLLOUT
    expected_weights = straight.trainer.backend.named_weights()
    for name, value in resumed.trainer.backend.named_weights().items():
        assert torch.equal(value, expected_weights[name]), name


def test_incompatible_checkpoint_is_refused_naming_the_fields(say7, tmp_path):
    root, model, data = say7
    save = tmp_path / "ckpt"
    run_loop(flags(model, data, tmp_path / "run", save, 1))
    wider = build_checkpoint(tmp_path / "wider", shape=TinyModelShape(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512), seed=0)
    config = parse_config(flags(wider, data, tmp_path / "run2", tmp_path / "ckpt2", 2, "--load", str(save),
                                "--rollout-batch-size", "4", "--advantage-estimator", "dr_grpo"))
    validate(config)
    with pytest.raises(ConfigError) as error:
        build_run(config, log=lambda line: None)
    message = str(error.value)
    assert f"--load {save}: the checkpoint was saved by an incompatible run" in message
    assert "--rollout-batch-size: saved 8, now 4" in message
    assert "--global-batch-size: saved 64, now 32" in message
    assert "--advantage-estimator: saved 'grpo', now 'dr_grpo'" in message
    assert "model hidden_size (--hf-checkpoint): saved 32, now 64" in message

    lines: list[str] = []  # tuning changes are allowed, and reported
    config = parse_config(flags(model, data, tmp_path / "run3", tmp_path / "ckpt3", 2, "--load", str(save),
                                "--lr", "1e-2"))
    validate(config)
    build_run(config, log=lines.append).close()
    assert any("resumed from" in line and "--lr: 0.03 -> 0.01" in line for line in lines), lines


def test_save_hf_keep_checkpoints_and_no_save_optim_in_a_run(say7, tmp_path):
    root, model, data = say7
    save = tmp_path / "ckpt"
    run = run_loop(flags(model, data, tmp_path / "run", save, 3, "--save-interval", "1", "--keep-checkpoints", "2",
                         "--no-save-optim", "--save-hf", str(tmp_path / "hf_{rollout_id}")))
    assert sorted(p.name for p in save.iterdir()) == ["latest", "rollout_000001", "rollout_000002"]
    final = save / "rollout_000002"
    assert torch.load(final / "trainer.pt", weights_only=False)["optimizer"] is None
    saved_config = (final / "config.yaml").read_text()
    assert "rollout_batch_size: 8" in saved_config and "save_optim: false" in saved_config
    assert sorted(p.name for p in tmp_path.glob("hf_*")) == ["hf_0", "hf_1", "hf_2"]
    trained = run.trainer.backend.named_weights()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_2", dtype=torch.float32)
    for name, value in exported.state_dict().items():
        assert torch.equal(value, trained[name]), name
    engine = LocalEngine(str(tmp_path / "hf_2"), EngineConfig(device="cpu"))
    try:
        for name, value in engine.named_weights().items():
            assert torch.equal(value, trained[name]), name
    finally:
        engine.shutdown()

    lines: list[str] = []
    config = parse_config(flags(model, data, tmp_path / "run2", tmp_path / "ckpt2", 4, "--load", str(save)))
    validate(config)
    resumed = build_run(config, log=lines.append)
    resumed.close()
    assert resumed.schedule.start_rollout == 3
    assert any("no optimizer state" in line for line in lines), lines
    json.dumps(lines)  # plain strings


def test_a_step_saved_but_not_logged_before_a_kill_is_logged_on_resume(say7, tmp_path):
    """The loop saves a step's checkpoint before it logs the step; a kill in between must not lose the record."""
    root, model, data = say7
    save, run_dir = tmp_path / "ckpt", tmp_path / "run"
    run_loop(flags(model, data, run_dir, save, 2, "--save-interval", "1"))
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    logged_step_2 = json.loads(lines[-1])
    metrics.write_text("".join(lines[:-1]))  # as if killed after saving rollout_000001, before logging step 2
    run_loop(flags(model, data, run_dir, tmp_path / "ckpt2", 3, "--load", str(save)))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["rollout/reward_mean"] == logged_step_2["rollout/reward_mean"]
    assert records[1]["train/loss"] == logged_step_2["train/loss"]
