"""The `sluice` command: exit codes and messages for mistakes, `sluice plot`, and one tiny `sluice train`."""

from __future__ import annotations

import json
import logging
import re

import pytest

from sluice.cli import main
from sluice.observability.metrics import MetricsWriter, read_metrics

# The engine passes `past_key_values`, which newer transformers rename; the engine silences the notice at import,
# but pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_data(path, rows=4):
    path.write_text("".join(json.dumps({"input": f"say {i}", "label": str(i)}) + "\n" for i in range(rows)))
    return path


def train_flags(checkpoint, data, run_dir) -> list[str]:
    return ["train", "--hf-checkpoint", str(checkpoint), "--prompt-data", str(data), "--label-key", "label",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "2",
            "--num-rollout", "1", "--rm-type", "exact", "--train-device", "cpu", "--sglang-device", "cpu",
            "--run-dir", str(run_dir), "--no-progress-bar"]


def test_unknown_flag_exits_2_with_a_suggestion(capsys):
    assert main(["train", "--rollout-batchsize", "4"]) == 2
    err = capsys.readouterr().err
    assert "sluice train: error: unknown flag --rollout-batchsize" in err
    assert "did you mean --rollout-batch-size?" in err


def test_unknown_engine_flag_lists_the_supported_ones(capsys):
    assert main(["train", "--sglang-tp-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown flag --sglang-tp-size" in err and "--sglang-mem-fraction-static" in err


def test_missing_requirements_are_listed_together(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    for flag in ("--hf-checkpoint", "--prompt-data", "--rollout-batch-size", "--rm-type"):
        assert flag in err


def test_missing_data_file_exits_2_and_names_the_file(capsys, tiny_checkpoint, tmp_path):
    missing = tmp_path / "no_such_prompts.jsonl"
    assert main(train_flags(tiny_checkpoint, missing, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"sluice train: error: {missing}: no such file" in err
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_unknown_command_exits_2(capsys):
    assert main(["trian", "--lr", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err
    assert "train, serve, bench, demo, plot" in err


def test_no_command_exits_2_and_help_lists_every_command_with_its_purpose(capsys):
    assert main([]) == 2
    assert "usage: sluice" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sluice [-h] [--version] {train,serve,bench,demo,plot} ...")
    for command in ("train", "serve", "bench", "demo", "plot"):
        line = next(line for line in out.splitlines() if line.startswith(f"  {command} "))
        assert len(line.split()) > 3, line  # the command and a purpose of several words


def test_version_prints_the_package_version(capsys):
    from sluice import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"sluice {__version__}\n"


@pytest.mark.parametrize("argv, usage", [
    (["train", "--help"], "usage: sluice train [-h] [--config FILE]"),
    (["serve", "--help"], "usage: sluice serve [-h] --model MODEL_PATH"),
    (["demo", "--help"], "usage: sluice demo [-h]"),
    (["plot", "--help"], "usage: sluice plot [-h]"),
    (["bench", "--help"], "usage: sluice bench [-h] {rollout,sync,loops,train}"),
    (["bench", "rollout", "--help"], "usage: sluice bench rollout [-h]"),
    (["bench", "train", "--help"], "usage: sluice bench train [-h]"),
])
def test_each_command_shows_its_own_usage_line(argv, usage, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's --help
        code = exit_info.code
    assert code == 0
    assert capsys.readouterr().out.startswith(usage)


def test_plot_writes_a_png(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir) as writer:
        writer.log({"eval/add/accuracy": 0.1}, step=0)
        for step in range(1, 6):
            writer.log({"rollout/reward_mean": step / 10, "eval/add/accuracy": step / 5}, step=step)
    assert main(["plot", str(run_dir)]) == 0
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert str(png) in capsys.readouterr().out

    other = tmp_path / "elsewhere"
    assert main(["plot", str(run_dir), "--out", str(other)]) == 0
    assert (other / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (other / "plots" / "reward.png").read_bytes()[:8] == PNG_MAGIC
    assert (other / "summary.html").read_text().startswith("<!DOCTYPE html>")


def test_plot_of_a_directory_without_metrics_exits_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "sluice plot: error:" in err and str(tmp_path / "nowhere" / "metrics.jsonl") in err
    with pytest.raises(SystemExit) as exit_info:  # argparse usage error: RUN_DIR is required
        main(["plot"])
    assert exit_info.value.code == 2


def test_train_runs_end_to_end(tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    run_dir = tmp_path / "run"
    assert main(train_flags(tiny_checkpoint, data, run_dir)) == 0
    out = capsys.readouterr().out
    assert f"metrics: {run_dir}/metrics.jsonl" in out
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1]
    assert records[0]["rollout/num_samples"] == 4.0 and records[0]["train/num_samples"] == 4.0
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_train_stops_with_the_cause_when_every_sample_fails(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_reward.py").write_text(
        "def score(sample):\n    raise RuntimeError('the judge is down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_data(tmp_path / "prompts.jsonl")
    argv = train_flags(tiny_checkpoint, data, tmp_path / "run")
    index = argv.index("--rm-type")
    argv = argv[:index] + argv[index + 2:] + ["--custom-rm-path", "broken_reward.score"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "4 of 4 samples of the rollout failed, more than --max-failed-sample-ratio" in err
    assert "the judge is down" in err


def test_unloadable_custom_reward_fails_before_loading_models(tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    argv = train_flags(tiny_checkpoint, data, tmp_path / "run")
    index = argv.index("--rm-type")
    argv = argv[:index] + argv[index + 2:] + ["--custom-rm-path", "no_such_module_xyz.score"]
    assert main(argv) == 2
    assert "--custom-rm-path" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--rollout-max-response-len", "--eval-max-response-len"])
def test_response_budget_beyond_the_context_fails_before_loading_models(flag, tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "data.jsonl")
    with open(f"{tiny_checkpoint}/config.json") as handle:
        context = json.load(handle)["max_position_embeddings"]
    assert main([*train_flags(tiny_checkpoint, data, tmp_path / "run"), flag, str(context)]) == 2
    err = capsys.readouterr().err
    assert (f"{flag} {context} leaves no room for a prompt in the model's context of {context} tokens "
            f"(max_position_embeddings in {tiny_checkpoint}/config.json)") in err
    argv = [*train_flags(tiny_checkpoint, data, tmp_path / "run"), "--sglang-context-length", "64", flag, "100"]
    assert main(argv) == 2
    assert "model's context of 64 tokens (--sglang-context-length)" in capsys.readouterr().err


def test_rollout_batch_larger_than_the_data_is_a_warning_naming_both_numbers(tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl", rows=1)
    argv = train_flags(tiny_checkpoint, data, tmp_path / "run")  # --rollout-batch-size 2
    assert main(argv) == 0
    assert (f"warning: --rollout-batch-size 2 is larger than the 1 prompts of {data}: each rollout draws every "
            "prompt about 2 times; lower --rollout-batch-size to at most 1") in capsys.readouterr().out
    assert main(train_flags(tiny_checkpoint, write_data(tmp_path / "two.jsonl", rows=2), tmp_path / "run2")) == 0
    assert "warning: --rollout-batch-size" not in capsys.readouterr().out


def test_a_prompt_too_long_for_the_context_fails_at_load_naming_file_and_line(tiny_checkpoint, tmp_path, capsys):
    with open(f"{tiny_checkpoint}/config.json") as handle:
        context = json.load(handle)["max_position_embeddings"]
    data = write_data(tmp_path / "prompts.jsonl", rows=3)
    with data.open("a") as handle:  # the demo tokenizer: one token per character
        handle.write(json.dumps({"input": "x" * (context - 1), "label": "0"}) + "\n")
    assert main(train_flags(tiny_checkpoint, data, tmp_path / "run")) == 2  # --rollout-max-response-len 2
    err = capsys.readouterr().err
    assert (f"{data}:4: the prompt is {context - 1} tokens, over the {context - 2} a prompt may take (the model's "
            f"context of {context} tokens (max_position_embeddings in {tiny_checkpoint}/config.json) minus "
            "--rollout-max-response-len 2)") in err
    eval_flags = ["--eval-prompt-data", "held_out", str(data), "--eval-max-response-len", "4"]
    assert main([*train_flags(tiny_checkpoint, write_data(tmp_path / "ok.jsonl"), tmp_path / "run2"),
                 *eval_flags]) == 2
    assert f"{data}:4: the prompt is {context - 1} tokens" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_rollout_max_prompt_len_drops_longer_prompts_with_a_warning(tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl", rows=2)
    with data.open("a") as handle:
        handle.write(json.dumps({"input": "x" * 40, "label": "0"}) + "\n")
    assert main([*train_flags(tiny_checkpoint, data, tmp_path / "run"), "--rollout-max-prompt-len", "30"]) == 0
    assert (f"warning: {data}: dropped 1 of 3 prompts longer than --rollout-max-prompt-len 30 tokens"
            in capsys.readouterr().out)
    with open(f"{tiny_checkpoint}/config.json") as handle:
        context = json.load(handle)["max_position_embeddings"]
    limit = str(context - 1)
    assert main([*train_flags(tiny_checkpoint, data, tmp_path / "run2"), "--rollout-max-prompt-len", limit]) == 2
    assert (f"--rollout-max-prompt-len {limit} plus --rollout-max-response-len 2 is {context + 1} tokens, more "
            f"than the model's context of {context}") in capsys.readouterr().err


def test_a_failing_reward_logs_its_traceback_once_and_a_count_per_step(tiny_checkpoint, tmp_path, caplog,
                                                                       monkeypatch):
    (tmp_path / "picky_reward.py").write_text(
        "def score(sample):\n"
        "    if sample.prompt == 'say 1':\n"
        "        raise ValueError('no answer key for ' + sample.prompt)\n"
        "    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = train_flags(tiny_checkpoint, write_data(tmp_path / "prompts.jsonl", rows=2), tmp_path / "run")
    index = argv.index("--rm-type")
    argv = argv[:index] + argv[index + 2:] + ["--custom-rm-path", "picky_reward.score",
                                              "--max-failed-sample-ratio", "0.5"]
    with caplog.at_level(logging.WARNING, logger="sluice.rollout"):
        assert main(argv) == 0
    text = caplog.text
    assert text.count("Traceback (most recent call last)") == 1
    assert f'File "{tmp_path / "picky_reward.py"}", line 3, in score' in text
    assert "ValueError: no answer key for say 1" in text
    # the group numbers are the buffer's: prompt "say 1" is the second group handed out (samples 2 and 3)
    assert re.search(r"reward fn picky_reward\.score raised ValueError on sample [23] \(group 1\)", text)
    assert re.search(r"reward fn picky_reward\.score raised ValueError 2 times this step "
                     r"\(first: sample [23], group 1\)", text)


def test_a_filter_that_raises_stops_the_run_with_its_own_frames(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_filter.py").write_text(
        "def keep(group_samples):\n"
        "    return len(group_samples) // 0 > 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = [*train_flags(tiny_checkpoint, write_data(tmp_path / "prompts.jsonl"), tmp_path / "run"),
            "--dynamic-sampling-filter-path", "broken_filter.keep", "--over-sampling-batch-size", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert ("sluice train: error: --dynamic-sampling-filter-path broken_filter.keep raised ZeroDivisionError: "
            "integer division or modulo by zero\nTraceback (most recent call last):\n"
            f'  File "{tmp_path / "broken_filter.py"}", line 2, in keep\n') in err
    assert err.rstrip().endswith("ZeroDivisionError: integer division or modulo by zero")
    assert "sluice/rollout" not in err  # none of the rollout's own frames


def test_a_failing_generate_function_is_named_as_given(tiny_checkpoint, tmp_path, caplog, monkeypatch):
    (tmp_path / "broken_generate.py").write_text(
        "from sluice.rollout.generate import generate_single_turn\n"
        "async def generate(sample, sampling_params, ctx):\n"
        "    if sample.prompt == 'say 0':\n"
        "        raise RuntimeError('tool server unreachable')\n"
        "    return await generate_single_turn(sample, sampling_params, ctx)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = [*train_flags(tiny_checkpoint, write_data(tmp_path / "prompts.jsonl", rows=2), tmp_path / "run"),
            "--custom-generate-function-path", "broken_generate.generate", "--max-failed-sample-ratio", "0.5"]
    with caplog.at_level(logging.WARNING, logger="sluice.rollout"):
        assert main(argv) == 0
    assert f'File "{tmp_path / "broken_generate.py"}", line 4, in generate' in caplog.text
    assert re.search(r"generate fn broken_generate\.generate raised RuntimeError 2 times this step "
                     r"\(first: sample [01], group 0\)", caplog.text)
