"""The benchmark commands run end to end on a tiny shape and report the workload they ran (no timings asserted)."""

from __future__ import annotations

import json

import pytest

from sluice.bench.rollout import make_workload, parse_args
from sluice.cli import main


def test_bench_rollout_prints_one_json_line_with_the_workload_it_ran(capsys):
    argv = ["--model-shape", "tiny", "--num-prompts", "3", "--n-samples-per-prompt", "2", "--min-len", "20",
            "--max-len", "40", "--compare-hf", "--hf-batch-size", "4", "--return-logprob", "--device", "cpu"]
    assert main(["bench", "rollout", *argv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    prompts, output_lens = make_workload(parse_args(argv), vocab_size=1024)
    assert report["output_tokens"] == sum(output_lens)  # EOS ignored: every sequence ran to its length
    assert report["prompt_tokens"] == sum(map(len, prompts))
    assert report["workload"]["n_samples_per_prompt"] == 2 and report["device"] == "cpu"
    # the second sample of each prompt reuses the first one's full prompt pages
    assert report["cached_prompt_tokens"] > 0
    assert report["output_tok_s"] > 0 and report["hf_generate_tok_s"] > 0 and report["kv_capacity_tokens"] > 0


def test_bench_without_a_known_name_is_a_usage_error(capsys):
    assert main(["bench", "nothing"]) == 2
    assert "usage: sluice bench" in capsys.readouterr().err


def test_bench_loops_runs_both_loops_on_a_demo_directory(tmp_path, small_shape, capsys):
    """Sync and --async from one (tiny, untrained) demo directory, trainer and engine in this process: one JSON
    line with each run's steps, accuracies and idle fractions, and the wall-time ratio."""
    from sluice.demo.model import build_checkpoint
    from sluice.demo.run import build_task_files

    build_checkpoint(tmp_path / "sft_model", shape=small_shape, seed=0)
    build_task_files(tmp_path / "data", num_train=8, num_eval=4, seed=0)
    argv = ["--demo-dir", str(tmp_path), "--num-rollout", "2", "--rollout-batch-size", "2", "--orchestrator", "local"]
    assert main(["bench", "loops", *argv]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["runs"]) == {"sync", "async"} and report["num_rollout"] == 2
    for name, run in report["runs"].items():
        assert run["steps"] == 2 and run["wall_s"] > 0, name
        assert 0.0 <= run["add"] <= 1.0 and 0.0 <= run["reverse"] <= 1.0
        assert 0.0 <= run["rollout_idle_frac"] <= 1.0 and 0.0 <= run["train_idle_frac"] <= 1.0
    assert report["runs"]["sync"]["max_staleness"] == 0.0
    assert report["async_over_sync_wall"] == round(report["runs"]["async"]["wall_s"] / report["runs"]["sync"]["wall_s"], 3)
    assert (tmp_path / "bench_loops" / "async" / "metrics.jsonl").exists()


def test_bench_loops_names_what_the_demo_directory_lacks(tmp_path, capsys):
    assert main(["bench", "loops", "--demo-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "sft_model") in error and "sluice demo --out" in error
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        main(["bench", "loops", "--demo-dir", str(tmp_path), "--loops", "sync,fast"])
    assert exited.value.code == 2 and "--loops fast" in capsys.readouterr().err
