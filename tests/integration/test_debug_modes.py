"""--debug-rollout-only, --debug-train-only, and saving / replaying rollout data."""

from __future__ import annotations

import pytest
import torch

from sluice.checkpoint.rollout_data import load_rollout_data
from sluice.config import ConfigError, parse_config, validate
from sluice.observability.metrics import read_metrics
from helpers.train_loop import N_SAMPLES, ROLLOUT_BATCH, flags, run_loop

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


def steps(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["step"] > 0]


def test_replaying_saved_rollouts_reproduces_the_training_steps(say7, tmp_path):
    root, model, data = say7
    template = str(tmp_path / "rollouts" / "r_{rollout_id}.json")
    generated = run_loop(flags(model, data, tmp_path / "gen", tmp_path / "ck1", 3, "--save-debug-rollout-data",
                               template))
    replayed = run_loop(flags(model, data, tmp_path / "replay", tmp_path / "ck2", 3, "--debug-train-only",
                              "--load-debug-rollout-data", template))
    assert replayed.engines is None  # no engine: nothing generated, nothing synced
    for original, replay in zip(steps(tmp_path / "gen"), steps(tmp_path / "replay"), strict=True):
        for key in ("train/loss", "train/grad_norm", "train/pg_loss", "train/entropy", "rollout/reward_mean"):
            assert replay[key] == original[key], (original["step"], key)
    expected = generated.trainer.backend.named_weights()
    for name, value in replayed.trainer.backend.named_weights().items():
        assert torch.equal(value, expected[name]), name
    groups = load_rollout_data(tmp_path / "rollouts" / "r_2.json", rollout_id=2)
    assert len(groups) == ROLLOUT_BATCH and all(len(g.samples) == N_SAMPLES for g in groups)
    assert [s.index for g in groups for s in g.samples] == list(range(2 * 64, 3 * 64))


def test_rollout_only_generates_and_scores_without_training(say7, tmp_path):
    root, model, data = say7
    argv = flags(model, data, tmp_path / "run", tmp_path / "unused", 2, "--save-debug-rollout-data",
                 str(tmp_path / "r_{rollout_id}.json"), "--debug-rollout-only")
    argv.remove("--save")
    argv.remove(str(tmp_path / "unused"))
    run = run_loop(argv)
    assert run.trainer is None
    assert run.engines.engine.weight_version == 0  # never synced
    records = steps(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all("rollout/reward_mean" in r and not any(k.startswith("train/") for k in r) for r in records)
    assert "perf/train_time_s" not in records[0] and "perf/rollout_tokens_per_s" in records[0]
    assert sorted(p.name for p in tmp_path.glob("r_*.json")) == ["r_0.json", "r_1.json"]


def test_replay_with_an_engine_still_syncs_its_weights(say7, tmp_path):
    root, model, data = say7
    template = str(tmp_path / "r_{rollout_id}.json")
    run_loop(flags(model, data, tmp_path / "gen", tmp_path / "ck1", 2, "--save-debug-rollout-data", template))
    run = run_loop(flags(model, data, tmp_path / "replay", tmp_path / "ck2", 2, "--load-debug-rollout-data", template))
    assert run.engines.engine.weight_version == 2
    missing = flags(model, data, tmp_path / "more", tmp_path / "ck3", 3, "--debug-train-only",
                    "--load-debug-rollout-data", template)
    with pytest.raises(ConfigError, match=r"--load-debug-rollout-data: .*r_2.json: no such rollout data file"):
        run_loop(missing)


@pytest.mark.parametrize("extra, message", [
    (["--debug-train-only"], "--debug-train-only needs --load-debug-rollout-data"),
    (["--debug-train-only", "--load-debug-rollout-data", "r_{rollout_id}.json", "--eval-prompt-data", "a", "a.jsonl"],
     "--eval-prompt-data needs an engine"),
    (["--debug-rollout-only", "--debug-train-only", "--load-debug-rollout-data", "r.json"], "mutually exclusive"),
    (["--debug-rollout-only", "--save-hf", "hf_{rollout_id}"], "--save-hf has no effect with --debug-rollout-only"),
    (["--save-debug-rollout-data", "r.json"], "has no {rollout_id}"),
    (["--save-hf", "hf_{step}"], "only {rollout_id} may appear in braces"),
])
def test_debug_and_export_flag_mistakes_are_named(extra, message):
    argv = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "2", "--rm-type", "exact",
            "--label-key", "label", *extra]
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        validate(parse_config(argv))
