"""Whole runs of the "say 7" task: a reward that never varies is reported (zero-std group fraction 1.0) and
warned about, a varied one is not; the KL to the reference is logged with --use-kl-loss --kl-loss-coef 0, and
the trainer-vs-rollout KL estimate in every run."""

from __future__ import annotations

import json

import pytest

from sluice.observability.metrics import read_metrics
from helpers.train_loop import flags, run_loop

# The engine passes `past_key_values`, which newer transformers rename (see test_train_loop).
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

NO_SIGNAL = "warning: no learning signal"


def test_a_constant_reward_logs_fraction_one_and_warns_once(say7, tmp_path):
    root, model, _ = say7
    # A two-character label cannot be matched by a one-token response: every reward is 0.
    data = tmp_path / "unreachable.jsonl"
    data.write_text("".join(json.dumps({"input": f"{c}: say 77", "label": "77"}) + "\n" for c in "abcdefgh"))
    run_dir = tmp_path / "run"
    lines: list[str] = []
    run_loop(flags(model, data, run_dir, tmp_path / "ckpt", 2), log=lines.append)
    records = read_metrics(run_dir)
    assert [r["rollout/zero_std_group_fraction"] for r in records] == [1.0, 1.0]
    assert [r["rollout/reward_std"] for r in records] == [0.0, 0.0]
    assert [r["train/advantage_abs_mean"] for r in records] == [0.0, 0.0]
    assert [r["train/grad_norm"] for r in records] == [0.0, 0.0]
    messages = [line for line in lines if line.startswith(NO_SIGNAL)]
    assert len(messages) == 1, lines  # the first step; the next repeat is 10 steps later
    assert messages[0].startswith("warning: no learning signal at step 1: every group's rewards are equal (reward "
                                  "mean 0), so every advantage is 0 and the policy does not change")
    assert "--n-samples-per-prompt" in messages[0]


def test_a_varied_reward_run_logs_the_ref_kl_with_coef_0_and_does_not_warn(say7, tmp_path):
    root, model, data = say7
    # The untrained model's one-token answers are spread over the vocabulary: half the code points are odd.
    reward = tmp_path / "odd_reward.py"
    reward.write_text("def odd(sample):\n    return float(ord(sample.response[-1]) % 2) if sample.response else 0.0\n")
    argv = flags(model, data, tmp_path / "run", tmp_path / "ckpt", 2, "--use-kl-loss", "--kl-loss-coef", "0")
    index = argv.index("--rm-type")
    argv[index:index + 2] = ["--custom-rm-path", f"{reward}:odd"]
    run_dir = tmp_path / "run"
    lines: list[str] = []
    run_loop(argv, log=lines.append)
    records = read_metrics(run_dir)
    assert not [line for line in lines if line.startswith("warning:")], lines
    assert all(r["rollout/zero_std_group_fraction"] < 1.0 and r["train/advantage_abs_mean"] > 0 for r in records)
    # The reference is the initial policy: KL 0 before the first update, positive after it.
    assert records[0]["train/ref_kl"] == 0.0 and records[1]["train/ref_kl"] > 0.0
    assert records[1]["train/kl_loss"] != 0.0  # the k1 estimate of the loss term, logged though weighted 0
    # The engine and the trainer run the same weights on CPU: their policies agree to rounding.
    assert all(0.0 <= r["train/rollout_policy_kl"] < 1e-4 for r in records)


def test_without_a_reference_no_ref_kl_is_logged_but_the_rollout_policy_kl_is(say7, tmp_path):
    root, model, data = say7
    run_loop(flags(model, data, tmp_path / "run", tmp_path / "ckpt", 1))
    (record,) = read_metrics(tmp_path / "run")
    assert "train/ref_kl" not in record and "train/kl_loss" not in record
    assert 0.0 <= record["train/rollout_policy_kl"] < 1e-4
