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


def test_bench_train_prints_one_json_line_with_both_trainers_figures(capsys):
    from sluice.bench.train import main as bench_train_main
    from sluice.bench.train import make_samples
    from sluice.bench.train import parse_args as parse_train_args

    argv = ["--model-shape", "tiny", "--num-prompts", "2", "--n-samples-per-prompt", "2", "--max-len", "32",
            "--steps", "1", "--compare-hf", "--with-old-logprobs", "--device", "cpu"]
    assert bench_train_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    samples = make_samples(parse_train_args(argv), vocab_size=1024)
    assert len(samples) == 4 and samples[0].prompt_tokens == samples[1].prompt_tokens  # a group shares its prompt
    assert report["tokens_per_step"] == sum(len(s.tokens) for s in samples)
    assert report["response_tokens_per_step"] == sum(s.response_length for s in samples)
    assert report["workload"]["len_range"] == [32, 32] and report["device"] == "cpu"
    assert report["train_dtype"] == "float32" and report["commit"] and report["torch"]
    assert report["mfu_formula"] == "(6*N*tokens + 6*L*q_size*sum(len_i^2)) / time / peak"
    assert report["peak_tflops"] is None and report["mfu"] is None and report["hf"]["mfu"] is None
    assert report["peak_memory_gib"] is None  # CPU: no allocator statistics
    assert report["train_tok_s"] > 0 and report["old_logprobs_tok_s"] > 0 and report["hf"]["train_tok_s"] > 0
    assert len(report["train_step_s_each"]) == 1 and report["optimizer_s"] <= report["train_step_s"]
    batching = report["batching"]
    assert batching["packed"] and batching["num_micro_batches"] == 1  # 256 tokens fit the CPU budget
    assert batching["computed_tokens"] == report["tokens_per_step"]  # packed: no padding computed
    assert report["speedup_vs_hf"] == pytest.approx(report["train_tok_s"] / report["hf"]["train_tok_s"], rel=1e-2)


def test_bench_train_times_the_host_optimizer(capsys):
    from sluice.bench.train import main as bench_train_main

    argv = ["--model-shape", "tiny", "--num-prompts", "2", "--n-samples-per-prompt", "2", "--max-len", "32",
            "--steps", "2", "--device", "cpu", "--optimizer-cpu-offload"]
    assert bench_train_main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["optimizer_cpu_offload"] is True
    assert 0 < report["optimizer_s"] <= report["train_step_s"] and report["train_tok_s"] > 0


def test_running_out_of_memory_in_the_timed_loop_names_the_phase_and_step():
    import torch

    from sluice.bench.train_timing import PhaseOutOfMemory, time_steps

    calls = []

    def train_step() -> None:
        calls.append("train")
        if calls.count("train") == 3:  # the first timed step, after two warm-up steps
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")

    with pytest.raises(PhaseOutOfMemory) as raised:
        time_steps(torch.device("cpu"), 2, 3, train_step, None, old_logprobs=lambda: calls.append("old"))
    assert str(raised.value) == ("out of memory in the train step (timed step 1): "
                                 "CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert calls == ["old", "train"] * 2 + ["old", "train"]


def test_bench_train_refuses_a_token_budget_with_padded_micro_batches(capsys):
    from sluice.bench.train import parse_args as parse_train_args

    with pytest.raises(SystemExit):
        parse_train_args(["--no-use-dynamic-batch-size", "--max-tokens-per-gpu", "4096"])
    assert "--max-tokens-per-gpu has no effect" in capsys.readouterr().err


def test_train_flops_match_a_hand_count_on_the_tiny_shape():
    from sluice.bench.flops import matmul_parameters, mfu, train_flops
    from sluice.bench.shapes import shape_config

    config = shape_config("tiny")  # hidden 64, FFN 128, 2 layers, 4 q / 2 kv heads of 16, vocab 1024, tied
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128  # qkv, o, gate/up/down = 36,864
    assert matmul_parameters(config) == 2 * per_layer + 1024 * 64 == 139_264  # the tied head counted once
    lengths = [3, 5]  # 8 tokens, sum of squares 34
    # 6 N tokens + 6 L q_size sum(len^2): 6,684,672 + 26,112
    assert train_flops(config, lengths) == 6 * 139_264 * 8 + 6 * 2 * 64 * 34 == 6_710_784
    assert train_flops(config, lengths, backward=False) == 2 * 139_264 * 8 + 2 * 2 * 64 * 34 == 2_236_928
    assert mfu(2e12, 2.0, peak_tflops=1.0) == 1.0 and mfu(2e12, 2.0, peak_tflops=None) is None


def test_matmul_parameters_of_qwen2_5_7b_match_its_published_non_embedding_count():
    from sluice.bench.flops import matmul_parameters
    from sluice.bench.shapes import shape_config

    config = shape_config("qwen2.5-7b")  # untied: the head is a matmul, the embedding a gather
    head = 152064 * 3584
    assert abs((matmul_parameters(config) - head) - 6.53e9) < 0.01e9  # Qwen2.5 report: 6.53B non-embedding
