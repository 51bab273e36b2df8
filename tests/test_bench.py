"""The benchmark commands run end to end on a tiny shape and report the workload they ran (no timings asserted)."""

from __future__ import annotations

import json

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
