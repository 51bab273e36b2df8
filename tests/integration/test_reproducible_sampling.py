"""Reproducible sampling in whole runs (docs/reproducibility.md): multi-token responses at temperature 1, with the
default --rollout-seed. Two sync runs draw the same samples and end on the same weights; a run killed after a
checkpoint and relaunched with --load continues like the uninterrupted one; two async runs agree on every
sample drawn by the same weights from the same context.

The second run of each pair batches its requests differently (``OTHER_BATCHES``): with the engine's shared random
stream, runs repeat only while their batches happen to repeat (often, on an idle machine); seeded requests do
not depend on their batches at all, and this makes the tests tell the two apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sluice.checkpoint.rollout_data import load_rollout_data
from sluice.loops import train
from helpers.train_loop import flags, run_loop
from helpers.train_process import kill_after_first_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

NUM_ROLLOUT = 3
# 4 prompts x 4 samples, up to 12 sampled tokens each; the random reward (seeded by --rollout-seed, the sample
# index and the response) gives every group a reward spread, so GRPO moves the weights at every step
SAMPLING = ["--rollout-max-response-len", "12", "--rollout-temperature", "1.0", "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "4", "--global-batch-size", "16", "--rm-type", "random"]
OTHER_BATCHES = ["--sglang-max-running-requests", "3"]  # decode batches of at most 3 rows, not all 16


def argv(say7, root: Path, *extra: str) -> list[str]:
    _, model, data = say7
    save = root / "ckpt"
    return flags(model, data, root / "run", save, NUM_ROLLOUT, *SAMPLING,
                 "--save-debug-rollout-data", str(root / "data" / "r_{rollout_id}.json"), *extra)


def samples_by_index(root: Path) -> dict[int, object]:
    """Every trained sample of a run's debug rollout data, by Sample.index."""
    out = {}
    for path in sorted((root / "data").glob("r_*.json")):
        for group in load_rollout_data(path):
            for sample in group.samples:
                out[sample.index] = sample
    return out


def assert_same_samples(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for index, sample in expected.items():
        assert got[index].tokens == sample.tokens, index
        assert got[index].reward == sample.reward, index
        # CPU matmuls may round a row differently in another batch: logprobs agree to float noise
        assert got[index].rollout_log_probs == pytest.approx(sample.rollout_log_probs, abs=1e-4), index


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_two_sync_runs_draw_the_same_samples_and_end_on_the_same_weights(say7, tmp_path):
    first = run_loop(argv(say7, tmp_path / "first"))
    second = run_loop(argv(say7, tmp_path / "second", *OTHER_BATCHES))
    expected, got = samples_by_index(tmp_path / "first"), samples_by_index(tmp_path / "second")
    assert len(expected) == NUM_ROLLOUT * 16
    assert max(s.response_length for s in expected.values()) > 1  # multi-token responses
    assert len({tuple(s.tokens) for s in expected.values()}) > len(expected) // 2  # samples of a group differ
    assert_same_samples(got, expected)
    initial = say7_weights(say7)
    trained = first.trainer.backend.named_weights()
    assert any(not torch.equal(trained[name], value) for name, value in initial.items())  # training moved them
    assert_same_weights(second.trainer.backend.named_weights(), trained)


def test_a_run_killed_after_a_checkpoint_and_resumed_matches_the_uninterrupted_run(say7, tmp_path):
    def resumable(name: str, *extra: str) -> list[str]:
        save = tmp_path / name / "ckpt"
        return argv(say7, tmp_path / name, "--save-interval", "1", "--load", str(save), *extra)

    straight = run_loop(resumable("straight"))
    kill_after_first_checkpoint(resumable("killed"), tmp_path / "killed" / "ckpt")
    resumed = run_loop(resumable("killed", *OTHER_BATCHES))
    assert 0 < resumed.schedule.start_rollout < NUM_ROLLOUT  # it did resume, and had steps left to run
    assert_same_samples(samples_by_index(tmp_path / "killed"), samples_by_index(tmp_path / "straight"))
    assert_same_weights(resumed.trainer.backend.named_weights(), straight.trainer.backend.named_weights())


def test_two_async_runs_agree_on_samples_drawn_by_the_same_weights(say7, tmp_path):
    """What the async loop guarantees: a sample drawn entirely by weight version v from the same context has the
    same tokens in both runs. Which samples a version draws depends on timing, so later versions can differ;
    every sample of the first step is drawn by version 0."""
    runs = []
    for name, extra in (("first", []), ("second", OTHER_BATCHES)):
        root = tmp_path / name
        run_loop(argv(say7, root, "--async", *extra), loop=train)
        runs.append(samples_by_index(root))
    first, second = runs
    by_initial_weights = [i for i in first if i in second
                          and first[i].weight_versions == second[i].weight_versions == [0]]
    assert len(by_initial_weights) >= 16
    for index in by_initial_weights:
        assert first[index].tokens == second[index].tokens, index
        assert first[index].rollout_log_probs == pytest.approx(second[index].rollout_log_probs, abs=1e-4), index


def say7_weights(say7) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    _, model, _ = say7
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return {name: value for name, value in hf.state_dict().items()}
