"""SFT from data as a run: --rollout-function-path sft through build_run and the sync loop; no engine, except one
for the eval sets when --eval-prompt-data gives some."""

from __future__ import annotations

import json

import pytest

from helpers.train_loop import run_loop
from sluice.config import ConfigError, parse_config, validate
from sluice.loops import train_sync
from sluice.orchestration.hooks import load_hooks
from sluice.orchestration.rollout_setup import prompt_data_config
from sluice.data import DataError
from sluice.observability.metrics import read_metrics
from sluice.observability.report import render_report
from sluice.observability.samples import read_samples
from sluice.orchestration import build_run
from sluice.sync.verify import checksum_differences


def _data(tmp_path, rows):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _flags(checkpoint, data, run_dir, *extra):
    return ["--hf-checkpoint", str(checkpoint), "--prompt-data", str(data), "--rollout-function-path", "sft",
            "--loss-type", "sft_loss", "--response-key", "answer.text", "--apply-chat-template",
            "--rollout-batch-size", "8", "--num-rollout", "6", "--lr", "1e-2", "--micro-batch-size", "8",
            "--seed", "0", "--train-device", "cpu", "--sglang-device", "cpu", "--run-dir", str(run_dir),
            "--no-progress-bar", *extra]


ROWS = [{"input": f"{a}+{a}=", "answer": {"text": str(2 * a)}} for a in range(10, 18)]


@pytest.mark.parametrize("name", ["sft", "slime.rollout.sft_rollout.generate_rollout"])
def test_sft_from_data_trains_without_an_engine_and_the_loss_falls(tmp_path, small_checkpoint, name):
    flags = _flags(small_checkpoint, _data(tmp_path, ROWS), tmp_path / "run", "--save-hf", str(tmp_path / "hf"))
    flags[flags.index("sft")] = name
    run = run_loop(flags)
    assert run.engines is None
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    samples = read_samples(tmp_path / "run")  # shown unscored: an SFT sample has no reward
    assert samples and all(r["source"] == "sft" and r["reward"] is None for r in samples)
    assert "<h2>Samples</h2>" in render_report(tmp_path / "run").html.read_text()


@pytest.mark.parametrize("extra, message", [
    (["--loss-type", "policy_loss"], r"--rollout-function-path sft trains on the responses in the data: set "
                                     r"--loss-type sft_loss"),
    (["--eval-prompt-data", "x", "x.jsonl"], r"--eval-prompt-data in an SFT run .* scores the eval responses with "
                                             r"a reward: set --rm-type"),
    (["--eval-function-path", "m.f"], r"--eval-function-path evaluates the --eval-prompt-data sets, and this SFT "
                                      r"run .* has none"),
    (["--rm-type", "exact"], r"--rm-type has no effect with --rollout-function-path sft without eval sets"),
    (["--eval-prompt-data", "x", "x.jsonl", "--rm-type", "exact", "--label-key", "label", "--debug-train-only"],
     r"--eval-prompt-data needs an engine, which --debug-train-only does not start: drop --debug-train-only"),
    (["--n-samples-per-prompt", "4"], r"--n-samples-per-prompt 4 with --rollout-function-path sft"),
    (["--eval-sft-data", "x"], r"--eval-sft-data takes NAME PATH pairs, got 1 values"),
    (["--eval-sft-data", "x", "x.jsonl", "--debug-rollout-only"], r"--eval-sft-data is scored by the trainer"),
])
def test_sft_flags_that_cannot_work_are_config_errors(tmp_path, extra, message):
    flags = _flags("ckpt", "data.jsonl", tmp_path)
    if extra[1] is None:
        i = flags.index(extra[0])
        del flags[i:i + 2]
    elif extra[0] in flags:
        flags[flags.index(extra[0]) + 1] = extra[1]
    else:
        flags += extra
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(flags))


def test_response_key_without_the_sft_function_is_a_config_error(tmp_path):
    flags = ["--hf-checkpoint", "c", "--prompt-data", "d.jsonl", "--rollout-batch-size", "2", "--rm-type", "exact",
             "--label-key", "label", "--n-samples-per-prompt", "2", "--response-key", "answer"]
    with pytest.raises(ConfigError, match=r"--response-key is read only by the SFT rollout function"):
        validate(parse_config(flags))


def test_held_out_sft_data_without_the_sft_function_is_a_config_error(tmp_path):
    flags = ["--hf-checkpoint", "c", "--prompt-data", "d.jsonl", "--rollout-batch-size", "2", "--rm-type", "exact",
             "--label-key", "label", "--n-samples-per-prompt", "2", "--eval-sft-data", "x", "x.jsonl"]
    with pytest.raises(ConfigError, match=r"--eval-sft-data holds SFT rows .* it needs --rollout-function-path sft"):
        validate(parse_config(flags))


def test_a_missing_response_key_fails_before_any_model_loads(tmp_path, small_checkpoint):
    rows = [{"input": "1+1=", "answer": {"number": 2}}]
    config = parse_config(_flags(small_checkpoint, _data(tmp_path, rows), tmp_path / "run"))
    validate(config)
    with pytest.raises(DataError, match=r"sft.jsonl:1: missing key 'answer.text' \(set by --response-key\); "
                                        r"'answer' has no 'text'"):
        build_run(config, log=lambda line: None)


def test_slime_sft_script_flags_are_accepted(tmp_path):
    """The SFT flags of slime's scripts, as written: no --response-key, the input is the whole conversation."""
    flags = ["--hf-checkpoint", "c", "--prompt-data", "d.jsonl", "--rollout-function-path",
             "slime.rollout.sft_rollout.generate_rollout", "--input-key", "messages",
             "--apply-chat-template", "--loss-type", "sft_loss", "--loss-mask-type", "qwen3",
             "--calculate-per-token-loss", "--disable-compute-advantages-and-returns", "--debug-train-only",
             "--rollout-shuffle", "--num-epoch", "1", "--rollout-batch-size", "8", "--global-batch-size", "8"]
    config = parse_config(flags)
    validate(config)
    assert config.rollout.sft_from_data and config.data.response_key is None
    assert prompt_data_config(config, load_hooks(config)).response_key == "messages"


def test_a_slime_style_sft_run_on_whole_conversations(tmp_path, small_checkpoint):
    """slime's SFT flags (--input-key messages, no --response-key, --debug-train-only): trains, starts no engine."""
    rows = [{"messages": [{"role": "system", "content": "Double it."}, {"role": "user", "content": f"{a}"},
                          {"role": "assistant", "content": str(2 * a)}]} for a in range(10, 14)]
    flags = _flags(small_checkpoint, _data(tmp_path, rows), tmp_path / "run", "--debug-train-only",
                   "--loss-mask-type", "qwen", "--input-key", "messages", "--rollout-batch-size", "4",
                   "--num-rollout", "2")
    i = flags.index("--response-key")
    del flags[i:i + 2]
    run = run_loop(flags)
    assert run.engines is None
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(r["train/loss"] > 0 for r in records)


def _sft_eval_flags(model, rows, eval_set, run_dir, *extra):
    flags = _flags(model, rows, run_dir, "--eval-prompt-data", "say7", str(eval_set), "--eval-interval", "3",
                   "--eval-temperature", "0", "--eval-max-response-len", "1", "--rm-type", "exact",
                   "--label-key", "label", *extra)
    flags[flags.index("--lr") + 1] = "3e-2"
    return flags


def test_sft_with_an_eval_set_evaluates_the_trained_weights_on_an_engine(tmp_path, say7_sft):
    """An engine starts for the eval set alone; weights go to it before each eval (steps 3 and 6), not after every
    step, and the eval scores what training made of the model: a newline (0) at first, '7' (1) at the end, on the
    4 prompts SFT never saw too."""
    held = {}

    def train_then_read_the_engine(run):
        train_sync(run)
        held["version"], held["engine"] = run.engines.engine.weight_checksums()
        held["trainer"] = run.trainer.weight_checksums()

    run_loop(_sft_eval_flags(*say7_sft, tmp_path / "run"), loop=train_then_read_the_engine)
    assert held["version"] == 6 and checksum_differences(held["trainer"], held["engine"]) == []
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval/say7/accuracy" in r] == [0, 3, 6]
    assert [r["step"] for r in records if "sync/seconds" in r] == [3, 6]  # pushed only before an eval
    accuracy = {r["step"]: r["eval/say7/accuracy"] for r in records if "eval/say7/accuracy" in r}
    assert accuracy[0] == 0.0 and accuracy[6] == 1.0, accuracy
    eval_samples = [r for r in read_samples(tmp_path / "run") if r["source"] == "eval/say7"]
    assert {r["step"] for r in eval_samples} == {0, 3, 6} and all(r["reward"] is not None for r in eval_samples)


def test_an_sft_eval_budget_past_the_context_fails_before_any_model_loads(tmp_path, say7_sft):
    """The eval generates up to --eval-max-response-len (default --rollout-max-response-len, 1024) tokens: past the
    tiny model's context of 512 it is refused at start, naming the eval's flag."""
    flags = _sft_eval_flags(*say7_sft, tmp_path / "run")
    i = flags.index("--eval-max-response-len")
    del flags[i:i + 2]
    config = parse_config(flags)
    validate(config)
    with pytest.raises(ConfigError, match=r"--eval-max-response-len \(default: --rollout-max-response-len\) 1024 "
                                          r"leaves no room for a prompt in the model's context of 512 tokens"):
        build_run(config, log=lambda line: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_held_out_sft_rows_report_their_loss_at_each_eval_without_an_engine(tmp_path, say7_sft):
    """--eval-sft-data: the trainer's loss on held-out rows at steps 0, 3 and 6, no engine (--debug-train-only, as
    slime's SFT scripts have it, still applies). On the training rows themselves, the step-0 value is the first
    training step's loss (the same forward pass), and it falls with training."""
    _, rows, _ = say7_sft
    flags = _flags(say7_sft[0], rows, tmp_path / "run", "--eval-sft-data", "seen", str(rows), "--eval-interval", "3",
                   "--debug-train-only")
    run = run_loop(flags)
    assert run.engines is None
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = {r["step"]: r["eval/seen/sft_loss"] for r in records if "eval/seen/sft_loss" in r}
    assert list(losses) == [0, 3, 6] and "eval/response_tokens" not in records[0]
    assert losses[0] == pytest.approx(records[1]["train/loss"], rel=1e-5)
    assert losses[6] < 0.8 * losses[3] < 0.8 * losses[0], losses
    assert records[0]["eval/seen/sft_tokens"] == 8 * 2  # "7" and the end-of-turn token of each row


def test_the_sft_loss_is_the_models_own_nll_whatever_the_rollout_temperature(tmp_path, say7_sft):
    """--rollout-temperature sets how eval sets are sampled; the SFT objective and its held-out loss stay at
    temperature 1."""
    _, rows, _ = say7_sft
    first_losses = []
    for temperature in ("1.0", "0.5"):
        run_dir = tmp_path / f"run{temperature}"
        run_loop(_flags(say7_sft[0], rows, run_dir, "--eval-sft-data", "seen", str(rows), "--num-rollout", "1",
                        "--debug-train-only", "--rollout-temperature", temperature))
        records = read_metrics(run_dir / "metrics.jsonl")
        first_losses.append((records[0]["eval/seen/sft_loss"], records[1]["train/loss"]))
    assert first_losses[1] == pytest.approx(first_losses[0], rel=1e-6)
