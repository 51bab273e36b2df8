"""Hooks wired into real runs (tiny model, 2 steps each): rollout, buffer filter, custom advantage, eval and reward
functions by path; a generated data source without --prompt-data; an openai-client agent through the gateway; a
slime-style generate function over the gateway's /generate; tools; and the failure budget through `sluice train`."""

from __future__ import annotations

import json

import pytest

from sluice.cli import main
from sluice.demo.model import build_checkpoint
from sluice.observability.metrics import read_metrics

from helpers.train_loop import run_loop

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")
SLIME_GENERATE = '''
import httpx

async def generate(args, sample, sampling_params):
    """slime's shape: post to SGLang's /generate at the router address, fill in the sample."""
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    body = {"input_ids": sample.prompt_tokens, "sampling_params": sampling_params, "return_logprob": True}
    async with httpx.AsyncClient() as client:
        out = (await client.post(url, json=body, timeout=60)).json()
    sample.tokens = sample.prompt_tokens + out["output_ids"]
    sample.response = out["text"]
    sample.response_length = len(out["output_ids"])
    sample.rollout_log_probs = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    sample.loss_mask = [1] * sample.response_length
    sample.status = "completed" if out["meta_info"]["finish_reason"]["type"] == "stop" else "truncated"
    return sample
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory, small_shape):
    root = tmp_path_factory.mktemp("hooks_run")
    data = root / "say7.jsonl"
    data.write_text("".join(json.dumps({"input": f"{c}: say 7", "label": "7", "metadata": {"task": "say"}}) + "\n"
                            for c in "abcdefgh"))
    return {"root": root, "data": data, "model": build_checkpoint(root / "model", shape=small_shape, seed=0)}


def base(task, run_dir, *extra) -> list[str]:
    return ["--hf-checkpoint", str(task["model"]), "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
            "--rollout-max-response-len", "2", "--num-rollout", "2", "--lr", "1e-3", "--micro-batch-size", "16",
            "--train-device", "cpu", "--sglang-device", "cpu", "--run-dir", str(run_dir), "--no-progress-bar",
            *extra]


def run(argv: list[str]) -> list[dict]:
    finished = run_loop(argv)
    return [r for r in read_metrics(finished.config.logging.run_dir + "/metrics.jsonl") if "rollout/num_samples" in r]


def test_rollout_buffer_filter_advantage_eval_and_reward_plugins(task, tmp_path):
    records = run(base(task, tmp_path / "run", "--prompt-data", str(task["data"]), "--label-key", "label",
                       "--custom-rm-path", "examples/plugins/rewards.py:exact_with_length_penalty",
                       "--rollout-function-path", "examples.plugins.rollout.hardest_first",
                       "--buffer-filter-path", "examples.plugins.filters:most_varied",
                       "--custom-advantage-function-path", "examples.plugins.training.leave_one_out",
                       "--eval-function-path", "examples.plugins.rollout.accuracy_by_task",
                       "--eval-prompt-data", "say7", str(task["data"]), "--eval-temperature", "0"))
    assert len(records) == 2
    for record in records:
        assert 0 <= record["rollout/solved_groups_frac"] <= 1  # the rollout function's metric
        assert record["rollout/buffer_dropped_groups"] == 2.0  # most_varied keeps half of the 4 groups
        assert record["train/num_samples"] == 8.0 and "train/custom_advantage_mean" in record
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/say7/accuracy" in r]
    assert len(evals) == 2 and all("eval/say7/say_accuracy" in r for r in evals)  # before training and at the end


def test_a_generated_data_source_needs_no_prompt_file(task, tmp_path):
    records = run(base(task, tmp_path / "run", "--data-source-path", "examples.plugins.data.AdditionStream",
                       "--apply-chat-template", "--rm-type", "exact", "--label-key", "label"))
    assert [r["rollout/num_samples"] for r in records] == [16.0, 16.0]


def test_an_openai_agent_trains_through_the_gateway(task, tmp_path):
    records = run(base(task, tmp_path / "run", "--prompt-data", str(task["data"]), "--label-key", "label",
                       "--apply-chat-template", "--rollout-max-response-len", "64",
                       "--agent-function-path", "examples.plugins.agent.answer_then_check"))
    for record in records:
        assert record["rollout/num_samples"] == 16.0 and record["rollout/failed_frac"] == 0.0
        assert record["train/num_samples"] == 16.0


def test_a_slime_generate_function_reaches_the_engine_over_http(task, tmp_path, monkeypatch):
    (tmp_path / "slime_generate.py").write_text(SLIME_GENERATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    records = run(base(task, tmp_path / "run", "--prompt-data", str(task["data"]), "--label-key", "label",
                       "--rm-type", "exact", "--custom-generate-function-path", "slime_generate.generate"))
    assert all(r["rollout/failed_frac"] == 0.0 and r["train/num_samples"] == 16.0 for r in records)


def test_tools_run_the_multi_turn_generate(tmp_path, small_shape):
    model = build_checkpoint(tmp_path / "model", shape=small_shape, seed=0, with_tools=True)
    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps({"input": f"{a}+{a}=", "label": str(2 * a)}) + "\n" for a in range(8)))
    records = run(base({"model": model}, tmp_path / "run", "--prompt-data", str(data), "--label-key", "label",
                       "--apply-chat-template", "--rm-type", "exact", "--rollout-max-response-len", "16",
                       "--tools", "examples/calculator_agent/tools.py:calculator", "--max-turns", "2"))
    assert all(r["rollout/turns"] >= 1.0 and "rollout/used_tool" in r for r in records)


def test_too_many_failed_samples_stop_sluice_train_with_the_errors(task, tmp_path, monkeypatch, capsys):
    (tmp_path / "failing_rm.py").write_text("def rm(sample):\n    raise RuntimeError('judge is down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["train", *base(task, tmp_path / "run", "--prompt-data", str(task["data"]), "--label-key", "label",
                                "--custom-rm-path", "failing_rm.rm")])
    err = capsys.readouterr().err
    assert code == 1
    assert "16 of 16 samples of the rollout failed, more than --max-failed-sample-ratio 0.5" in err
    assert "RuntimeError: judge is down" in err
