"""The whole synchronous loop on a tiny model and an easy task: reward rises, artifacts, save and resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.config import ConfigError, parse_config, validate
from sluice.demo.model import build_checkpoint
from sluice.loops import train_sync
from sluice.observability.metrics import read_metrics
from sluice.orchestration import build_run
from sluice.orchestration.run import Run

from helpers.train_loop import N_SAMPLES, NUM_ROLLOUT, ROLLOUT_BATCH, SEED, SHAPE, flags, run_loop

# The engine passes `past_key_values`, which newer transformers rename; the engine silences the notice at import,
# but pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    model = build_checkpoint(root / "model", shape=SHAPE, seed=SEED)
    data = root / "say7.jsonl"
    data.write_text("".join(json.dumps({"input": f"{c}: say 7", "label": "7"}) + "\n" for c in "abcdefghijkl"))
    paths = {"root": root, "model": model, "data": data, "run_dir": root / "run", "save": root / "ckpt"}
    argv = flags(model, data, paths["run_dir"], paths["save"], NUM_ROLLOUT, "--save-interval", "6",
                 "--eval-prompt-data", "say7", str(data), "--eval-temperature", "0", "--eval-interval", "6")
    run = run_loop(argv)
    return paths, run


def test_a_few_training_steps_raise_the_reward(trained):
    paths, _ = trained
    records = read_metrics(paths["run_dir"] / "metrics.jsonl")
    rewards = [r["rollout/reward_mean"] for r in records if "rollout/reward_mean" in r]
    assert len(rewards) == NUM_ROLLOUT
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.2  # the untrained model rarely says 7
    assert last > 0.4
    assert last > first + 0.3


def test_run_writes_metrics_curves_and_checkpoints(trained):
    paths, run = trained
    records = read_metrics(paths["run_dir"] / "metrics.jsonl")
    # step 0: eval before training; then one record per rollout, eval merged in every 6 rollouts
    assert [r["step"] for r in records] == list(range(NUM_ROLLOUT + 1))
    assert "eval/say7/accuracy" in records[0] and "rollout/reward_mean" not in records[0]
    assert [r["step"] for r in records if "eval/say7/accuracy" in r] == [0, 6, 12, NUM_ROLLOUT]
    for record in records[1:]:
        assert record["rollout/num_samples"] == ROLLOUT_BATCH * N_SAMPLES
        assert record["rollout/response_len_mean"] == 1.0
        assert record["train/num_samples"] == ROLLOUT_BATCH * N_SAMPLES
        assert record["train/num_steps"] == 1.0
        assert record["train/lr"] == pytest.approx(3e-2)
        for key in ("train/loss", "train/grad_norm", "train/entropy", "perf/rollout_time_s", "perf/train_time_s"):
            assert isinstance(record[key], float), key

    png = paths["run_dir"] / "curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC

    save = paths["save"]
    assert (save / "latest").read_text().strip() == f"rollout_{NUM_ROLLOUT - 1:06d}"
    assert sorted(p.name for p in save.iterdir() if p.is_dir()) == ["rollout_000005", "rollout_000011", f"rollout_{NUM_ROLLOUT - 1:06d}"]
    final = save / f"rollout_{NUM_ROLLOUT - 1:06d}"
    state = torch.load(final / "run_state.pt", weights_only=False)
    assert state["rollout_id"] == NUM_ROLLOUT - 1
    assert state["source"]["num_consumed"] == NUM_ROLLOUT * ROLLOUT_BATCH
    buffer_state = state["buffer"]  # the Data Buffer's: the same cursor, nothing left in flight or untrained
    assert buffer_state["source"] == state["source"] and buffer_state["requeued"] == buffer_state["finished"] == []
    assert buffer_state["weight_version"] == NUM_ROLLOUT
    exported = AutoModelForCausalLM.from_pretrained(final / "hf", dtype=torch.float32)
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, run.trainer.backend.named_weights()[name], atol=0, rtol=0, msg=name)
    # the engine was synced to the trainer after the last step
    assert run.engines.engine.weight_version == NUM_ROLLOUT
    for name, value in run.engines.engine.named_weights().items():
        torch.testing.assert_close(value, run.trainer.backend.named_weights()[name], atol=0, rtol=0, msg=name)


def test_load_resumes_at_the_next_rollout_with_the_same_data_cursor(trained):
    paths, original = trained
    run_dir = paths["root"] / "resumed_run"
    argv = flags(paths["model"], paths["data"], run_dir, paths["root"] / "ckpt_resumed", NUM_ROLLOUT + 2,
                 "--load", str(paths["save"]))
    config = parse_config(argv)
    validate(config)
    run = build_run(config, log=lambda line: None)
    try:
        assert run.schedule.start_rollout == NUM_ROLLOUT
        assert run.source.state_dict() == original.source.state_dict()
        assert run.buffer.state_dict() == original.buffer.state_dict()
        # the next prompts are those the original run would have handed out next (shuffled, mid-epoch)
        assert NUM_ROLLOUT * ROLLOUT_BATCH % 12 != 0
        resumed_next = [s.prompt for s in copy.deepcopy(run.source).next_batch(ROLLOUT_BATCH)]
        original_next = [s.prompt for s in copy.deepcopy(original.source).next_batch(ROLLOUT_BATCH)]
        assert resumed_next == original_next
        # trainer (weights, optimizer step count) and engine come back as they were saved
        assert run.trainer.backend.num_optimizer_steps == NUM_ROLLOUT
        saved = original.trainer.backend.named_weights()
        for name, value in run.trainer.backend.named_weights().items():
            torch.testing.assert_close(value, saved[name], atol=0, rtol=0, msg=name)
        assert run.engines.engine.weight_version == NUM_ROLLOUT
        for name, value in run.engines.engine.named_weights().items():
            torch.testing.assert_close(value, saved[name], atol=0, rtol=0, msg=name)
        assert not run.schedule.eval_before_train()  # a resumed run does not re-evaluate step 0
        train_sync(run)
    finally:
        run.close()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [NUM_ROLLOUT + 1, NUM_ROLLOUT + 2]
    assert run.source.num_consumed == (NUM_ROLLOUT + 2) * ROLLOUT_BATCH
    # the model kept what it learnt: still far above the untrained model's few percent
    assert sum(r["rollout/reward_mean"] for r in records) / 2 > 0.4


def test_load_from_an_empty_directory_fails_clearly(trained, tmp_path):
    paths, _ = trained
    config = parse_config(flags(paths["model"], paths["data"], tmp_path / "run", tmp_path / "save", 1,
                                "--load", str(tmp_path)))
    with pytest.raises(ConfigError, match="no checkpoint there"):
        build_run(config, log=lambda line: None)


def test_resumed_run_continues_exactly_like_an_uninterrupted_one(trained, tmp_path):
    """Stop after 3 rollouts, resume to 6: rollouts 4-6 match a straight 6-rollout run (data, weights, RNG)."""
    paths, _ = trained

    def rewards(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["rollout/reward_mean"] for r in read_metrics(run_dir) if "rollout/reward_mean" in r}

    straight = tmp_path / "straight"
    run_loop(flags(paths["model"], paths["data"], straight, tmp_path / "ckpt_straight", 6))
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run_loop(flags(paths["model"], paths["data"], first, tmp_path / "ckpt", 3))
    run_loop(flags(paths["model"], paths["data"], resumed, tmp_path / "ckpt_resumed", 6, "--load", str(tmp_path / "ckpt")))
    expected = rewards(straight)
    assert [rewards(first)[s] for s in (1, 2, 3)] == [expected[s] for s in (1, 2, 3)]
    assert sorted(rewards(resumed)) == [4, 5, 6]
    assert [rewards(resumed)[s] for s in (4, 5, 6)] == pytest.approx([expected[s] for s in (4, 5, 6)], abs=1e-6)


def test_dynamic_sampling_run_trains_on_groups_with_a_signal_and_the_reward_rises(trained, tmp_path):
    """DAPO: 12 prompts per round, groups with uniform rewards dropped, until 8 groups (or 8 rounds)."""
    paths, _ = trained
    num_rollout = 8
    argv = flags(paths["model"], paths["data"], tmp_path / "run", tmp_path / "ckpt", num_rollout,
                 "--dynamic-sampling-filter-path", "sluice.rollout.filters.drop_uniform_rewards",
                 "--over-sampling-batch-size", "12")
    run_loop(argv)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "rollout/reward_mean" in r]
    assert len(steps) == num_rollout
    for record in steps:
        assert 1 <= record["rollout/num_generation_rounds"] <= 8
        assert 0 <= record["rollout/num_kept_groups"] <= ROLLOUT_BATCH
        assert 0 <= record["rollout/filtered_groups_frac"] <= 1
        assert record["rollout/num_samples"] <= ROLLOUT_BATCH * N_SAMPLES
    assert any(r["rollout/num_generation_rounds"] > 1 for r in steps)  # groups were dropped and regenerated
    # rewards of kept groups only (uniform groups are dropped): 0.14 -> 0.88 with seed 0
    rewards = [r["rollout/reward_mean"] for r in steps]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.4


def test_ref_update_interval_refreshes_the_reference(trained, tmp_path):
    """With --ref-update-interval 1 the reference equals the policy that generated each rollout: KL exactly ~0."""
    paths, _ = trained
    kl_flags = ("--use-kl-loss", "--kl-loss-coef", "0.1", "--kl-loss-type", "k3")
    run = run_loop(flags(paths["model"], paths["data"], tmp_path / "every", tmp_path / "ck1", 4, *kl_flags,
                         "--ref-update-interval", "1"))
    kls = [r["train/kl_loss"] for r in read_metrics(tmp_path / "every") if "train/kl_loss" in r]
    assert len(kls) == 4 and max(abs(k) for k in kls) < 1e-6
    trainer = run.trainer.backend
    for (name, actor), (_, ref) in zip(trainer.model.named_parameters(), trainer.ref_model.named_parameters()):
        assert torch.equal(actor, ref), name

    fixed = run_loop(flags(paths["model"], paths["data"], tmp_path / "fixed", tmp_path / "ck2", 4, *kl_flags))
    fixed_kls = [r["train/kl_loss"] for r in read_metrics(tmp_path / "fixed") if "train/kl_loss" in r]
    assert fixed_kls[-1] > 1e-4  # a fixed reference drifts away from the trained policy
    fixed_trainer = fixed.trainer.backend
    assert not all(torch.equal(a, r) for a, r in zip(fixed_trainer.model.parameters(), fixed_trainer.ref_model.parameters()))
