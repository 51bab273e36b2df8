"""A verl-format parquet file (verl's GSM8K layout, built here) trains as is: nested keys, chat-message prompts, and
a reward hub that dispatches on the data source, as verl's ``default_compute_score`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.data_files import verl_rows, write_container
from helpers.train_loop import run_loop
from sluice.observability.metrics import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

REWARD_HUB = '''
import json

SEEN = {seen!r}


def exact(sample):
    return float(sample.response.strip() == sample.label)


def contains(sample):
    return float(sample.label in sample.response)


SCORERS = {{"openai/gsm8k": exact, "lighteval/MATH": contains}}


def compute_score(sample):
    source = sample.metadata["data_source"]
    with open(SEEN, "a") as handle:
        handle.write(json.dumps([source, sample.metadata["index"], sample.label]) + "\\n")
    return SCORERS[source](sample)
'''


def test_verl_parquet_trains_with_nested_keys_and_a_reward_by_data_source(say7, tmp_path: Path) -> None:
    _, model, _ = say7
    rows = verl_rows(8, ("openai/gsm8k", "lighteval/MATH"))
    data = write_container("parquet", rows, tmp_path / "data")
    seen = tmp_path / "seen.jsonl"
    hub = tmp_path / "reward_hub.py"
    hub.write_text(REWARD_HUB.format(seen=str(seen)))
    run_loop([
        "--hf-checkpoint", str(model), "--prompt-data", data, "--input-key", "prompt",
        "--label-key", "reward_model.ground_truth", "--metadata-key", "extra_info", "--apply-chat-template",
        "--custom-rm-path", f"{hub}:compute_score", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2",
        "--rollout-max-response-len", "1", "--num-rollout", "2", "--lr", "1e-3", "--micro-batch-size", "8",
        "--train-device", "cpu", "--sglang-device", "cpu", "--run-dir", str(tmp_path / "run"), "--no-progress-bar",
    ])
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 2 * 4 * 2  # every sample of both steps scored once
    assert {source for source, _, _ in calls} == {"openai/gsm8k", "lighteval/MATH"}
    assert all(source == rows[index]["data_source"] and label == "7" for source, index, label in calls)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [step["train/num_samples"] for step in metrics] == [8, 8]  # both steps trained
