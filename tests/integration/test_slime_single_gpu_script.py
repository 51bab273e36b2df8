"""slime's scripts/run-qwen3-0.6B-single-gpu.sh run to the end on CPU, from its argument lines in the corpus.

The changes are what a user makes for a tiny local model: the paths (--hf-checkpoint and --ref-load: the HF
model; --load and --save: one directory), MODEL_ARGS for the tiny model's sizes, and the sizes a user shrinks
(NUM_ROLLOUT, which the script passes to --num-rollout and --eval-interval; the response lengths). --run-dir
keeps the metrics in the test's directory. Every other flag is the script's, as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.architectures import build_arch_checkpoint, megatron_model_args
from sluice.config import parse_config, validate
from sluice.config.slime_compat import FLAGS, Treatment
from sluice.loops import train_sync
from sluice.orchestration import build_run

CORPUS = Path(__file__).resolve().parents[1] / "data" / "slime" / "flags.json"
SCRIPT = "scripts/run-qwen3-0.6B-single-gpu.sh"
# MODEL_ARGS of scripts/models/qwen3-0.6B.sh: replaced by the tiny model's (megatron_model_args).
MODEL_ARGS = {flag for flag, row in FLAGS.items() if row.treatment is Treatment.CHECKED and flag in {
    "--swiglu", "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--group-query-attention", "--num-query-groups", "--disable-bias-linear", "--normalization", "--norm-epsilon",
    "--rotary-base", "--vocab-size", "--kv-channels", "--qk-layernorm", "--untie-embeddings-and-output-weights"}}


def script_argv(root: Path, num_rollout: int) -> list[str]:
    script = next(s for s in json.loads(CORPUS.read_text())["scripts"] if s["path"] == SCRIPT)
    local = {
        "--hf-checkpoint": [str(root / "model")], "--ref-load": [str(root / "model")],
        "--load": [str(root / "save")], "--save": [str(root / "save")],
        "--prompt-data": [str(root / "train.parquet")], "--eval-prompt-data": ["gsm8k", str(root / "test.parquet")],
        "--num-rollout": [str(num_rollout)], "--eval-interval": [str(num_rollout)],
        "--rollout-max-response-len": ["8"], "--eval-max-response-len": ["8"],
    }
    argv: list[str] = []
    for flag, *words in script["args"]:
        if flag not in MODEL_ARGS:
            argv += [flag, *local.get(flag, words)]
    hf = json.loads((root / "model" / "config.json").read_text())
    return argv + megatron_model_args(hf) + ["--run-dir", str(root / "run"), "--no-progress-bar"]


def run_script(argv: list[str]) -> list[str]:
    config = parse_config(argv)
    validate(config)
    logged: list[str] = []
    run = build_run(config, log=logged.append)
    try:
        train_sync(run)
    finally:
        run.close()
    return logged


@pytest.fixture
def gsm8k_layout(tmp_path) -> Path:
    """A tiny Qwen3 checkpoint and parquet files of the script's GSM8K layout (messages, label)."""
    build_arch_checkpoint(tmp_path / "model", "qwen3")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "label": str(2 * i)}
            for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "test.parquet")
    return tmp_path


def test_single_gpu_script_runs_to_the_end_and_resumes(gsm8k_layout) -> None:
    root = gsm8k_layout
    logged = run_script(script_argv(root, num_rollout=2))
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["rollout/num_samples"] == 8 and r["train/num_samples"] == 8 for r in records)  # 2 prompts x 4
    assert "eval/gsm8k/accuracy" in records[-1] and "eval/gsm8k/accuracy" not in records[0]
    assert (root / "save" / "latest").exists()  # saved after the last step (--save-interval 5 > 2 steps)
    for flag in ("--attention-backend", "--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32"):
        assert any(line.startswith(f"{flag} accepted and ignored") for line in logged), flag
    # The script relaunched with a larger NUM_ROLLOUT resumes from --load (its --save directory).
    logged = run_script(script_argv(root, num_rollout=3))
    assert any(line.startswith("resumed from") and "at rollout 2" in line for line in logged)
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 3
