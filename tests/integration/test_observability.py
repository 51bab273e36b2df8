"""metrics.jsonl round trips, TensorBoard and W&B backends, curve plots and the HTML report, and the console
progress reporter."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sluice.observability import MetricsWriter, ProgressReporter, plot_curves, read_metrics
from helpers.train_loop import flags, run_loop

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- metrics -------------------------------------------------------------------------------------


def test_metrics_round_trip_with_nan_tensor_and_numpy(tmp_path):
    with MetricsWriter(tmp_path / "run") as writer:
        writer.log({"train/loss": torch.tensor(0.25), "train/grad_norm": float("nan")}, step=0)
        writer.log(
            {
                "rollout/reward_mean": np.float32(0.5),
                "perf/rollout_time_s": np.int64(3),
                "eval/add/accuracy": float("inf"),
            },
            step=1,
        )
        writer.log({"rollout/lengths": torch.tensor([1.0, float("nan")]), "step": 99}, step=2)

    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        json.loads(line)  # standard JSON: would fail on NaN/Infinity tokens

    records = read_metrics(path)
    assert records == [
        {"step": 0, "train/loss": 0.25, "train/grad_norm": None},
        {"step": 1, "rollout/reward_mean": 0.5, "perf/rollout_time_s": 3, "eval/add/accuracy": None},
        {"step": 2, "rollout/lengths": [1.0, None]},
    ]
    assert read_metrics(tmp_path / "run") == records  # a run directory works too


def test_metrics_writer_flushes_each_line_and_appends(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log({"train/loss": 1.0}, step=0)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "train/loss": 1.0}]  # before close
    writer.close()
    with MetricsWriter(tmp_path) as resumed:
        resumed.log({"train/loss": 0.5}, step=1)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]


def test_metrics_rejects_non_numeric_objects(tmp_path):
    with MetricsWriter(tmp_path) as writer, pytest.raises(TypeError, match="train/thing"):
        writer.log({"train/thing": object()}, step=0)


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a"')
    assert read_metrics(path) == [{"step": 0, "a": 1}]
    path.write_text('{"step": 0\n{"step": 1, "a": 1}\n')
    with pytest.raises(ValueError, match=":1:"):
        read_metrics(path)


# ---- plots ---------------------------------------------------------------------------------------


def _write_run(tmp_path, with_eval: bool):
    with MetricsWriter(tmp_path) as writer:
        for step in range(5):
            writer.log({"rollout/reward_mean": 0.1 * step, "train/loss": 1.0 / (step + 1)}, step=step)
            if with_eval and step % 2 == 0:
                writer.log({"eval/add/accuracy": 0.2 * step, "eval/mul/accuracy": 0.1 * step}, step=step)
    return tmp_path / "metrics.jsonl"


@pytest.mark.parametrize("with_eval", [True, False])
def test_plot_curves_writes_png(tmp_path, with_eval):
    metrics_path = _write_run(tmp_path, with_eval)
    out = plot_curves(metrics_path, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000


def test_plot_with_eval_has_a_second_panel(tmp_path):
    with_eval = plot_curves(_write_run(tmp_path / "a", True), tmp_path / "a.png")
    without = plot_curves(_write_run(tmp_path / "b", False), tmp_path / "b.png")

    def height(path):  # PNG IHDR: width and height as big-endian u32 at bytes 16..24
        return int.from_bytes(path.read_bytes()[20:24], "big")

    assert height(with_eval) > height(without)


def test_plot_curves_empty_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "empty.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


# ---- progress ------------------------------------------------------------------------------------


def test_progress_disabled_prints_one_line_per_step(capsys):
    reporter = ProgressReporter(total_steps=3, enabled=False)
    reporter.update(0, {"rollout/reward_mean": 0.25, "perf/step_time_s": 2.0})
    reporter.update(1, {"rollout/reward_mean": 0.5, "eval/add/accuracy": 0.75, "perf/step_time_s": 3.0})
    reporter.update(2, {"rollout/reward_mean": 0.625, "perf/step_time_s": 1.5})
    with reporter.stage("generate", total=4) as bar:  # a no-op when disabled: prints nothing
        bar.advance(4)
    reporter.close()

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("step 1/3")
    assert "reward=0.25" in lines[0] and "step_time=2.0s" in lines[0]
    assert "add_acc" not in lines[0]
    assert "add_acc=0.75" in lines[1]
    assert "add_acc=0.75" in lines[2]  # the last eval stays visible between evals
    assert "reward=0.625" in lines[2]


def test_progress_enabled_but_not_a_tty_also_prints_lines():
    stream = io.StringIO()
    reporter = ProgressReporter(total_steps=2, enabled=True, stream=stream)
    reporter.update(0, {"rollout/reward_mean": 1.0})
    with reporter.stage("generate", total=2) as bar:
        bar.advance()
    reporter.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step 1/2 reward=1")
    assert "step_time=" in lines[0]  # measured when not logged


class _FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_tty_draws_a_bar_with_postfix():
    stream = _FakeTty()
    with ProgressReporter(total_steps=None, enabled=True, stream=stream) as reporter:
        reporter.total_steps = 4  # known only later, as when the data loads after the reporter
        with reporter.stage("generate", total=3) as bar:
            bar.advance(3)
        reporter.update(0, {"rollout/reward_mean": 0.5, "eval/add/accuracy": 0.9, "perf/step_time_s": 1.0})
        reporter.update(1, {"rollout/reward_mean": 0.75})
    text = stream.getvalue()
    assert "\r" in text  # redrawn in place, not one line per step
    assert "2/4" in text
    assert "reward=0.75" in text and "add_acc=0.9" in text
    assert "generate" in text


def test_a_line_printed_outside_the_bar_starts_on_a_cleared_line_and_the_bar_comes_back_below_it():
    stream = _FakeTty()
    with ProgressReporter(total_steps=5, enabled=True, stream=stream) as reporter:
        reporter.update(0, {"rollout/reward_mean": 0.5})
        drawn = len(stream.getvalue())
        with reporter.outside_bar():
            print("warning: no learning signal at step 1", file=stream)
        after = stream.getvalue()[drawn:]
    before_line, line, rest = after.partition("warning: no learning signal at step 1\n")
    assert line and before_line.strip() == "" and before_line.endswith("\r")  # the bar's text was blanked first
    assert "1/5" in rest  # drawn again after the line


def test_metrics_writer_resuming_drops_steps_past_the_checkpoint(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(5):
            writer.log({"rollout/reward_mean": step / 10}, step=step)
    with MetricsWriter(tmp_path, resume_after_step=2) as writer:
        writer.log({"rollout/reward_mean": 0.9}, step=3)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["rollout/reward_mean"] == 0.9


# ---- TensorBoard, W&B, every per-step metric, the report -----------------------------------------------


def test_tensorboard_event_files_read_back_and_a_resume_purges_the_steps_it_redoes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sluice.observability.tensorboard_writer import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path / "tb")
    for step in range(1, 6):
        writer.log({"train/loss": 1.0 / step, "rollout/lengths": [1, 2], "note": "text"}, step=step)
    writer.close()
    resumed = TensorBoardWriter(tmp_path / "tb", resume_after_step=3)  # steps 4 and 5 are logged again
    for step in (4, 5):
        resumed.log({"train/loss": torch.tensor(10.0 * step)}, step=step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    points = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert points == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 40.0), (5, 50.0)]


def read_wandb_records(path):
    """The records of a .wandb file: a LevelDB-style log (7-byte header, 32 KiB blocks, each record a CRC,
    a length, a type, then protobuf bytes; FIRST/MIDDLE/LAST pieces join records split over blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pieces, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left in the block for a header: padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if kind == 0:
            break
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def test_a_run_logs_every_metric_to_jsonl_tensorboard_and_offline_wandb(say7, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    root, model, data = say7
    run_dir = tmp_path / "run"
    run_loop(flags(model, data, run_dir, tmp_path / "ckpt", 2, "--use-tensorboard", "--use-wandb",
                   "--wandb-mode", "offline", "--wandb-project", "sluice-test", "--eval-prompt-data", "say7",
                   str(data), "--eval-temperature", "0"))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    step = records[-1]
    expected = [
        "perf/rollout_time_s", "perf/train_time_s", "perf/sync_time_s", "perf/eval_time_s", "perf/step_time_s",
        "perf/rollout_tokens_per_s", "perf/train_tokens_per_s", "perf/eval_tokens_per_s",
        "rollout/reward_mean", "rollout/reward_std", "rollout/accuracy", "eval/say7/accuracy",
        "rollout/response_len_mean", "rollout/response_len_min", "rollout/response_len_max",
        "rollout/response_len_p50", "rollout/response_len_p90", "rollout/response_len_p99",
        "train/ppo_kl", "train/entropy", "train/clipfrac", "train/grad_norm", "train/rollout_logprob_abs_diff",
        "rollout/staleness_mean", "rollout/staleness_max", "train/nonfinite_skipped_steps",
        "train/nonfinite_skipped_total", "rollout/zero_std_group_fraction", "train/advantage_abs_mean",
        "train/rollout_policy_kl",
    ]
    assert [k for k in expected if not isinstance(step.get(k), (int, float))] == []
    assert step["rollout/staleness_max"] == 0 and step["train/nonfinite_skipped_total"] == 0

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert set(expected) <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("rollout/reward_mean")] == [
        (r["step"], pytest.approx(r["rollout/reward_mean"])) for r in records[1:]]

    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    (log_file,) = wandb_run.glob("run-*.wandb")
    history = {}
    for record in read_wandb_records(log_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = items
    assert sorted(history) == [0, 1, 2]
    assert history[2]["rollout/reward_mean"] == pytest.approx(step["rollout/reward_mean"])
    assert set(expected) <= set(history[2])


def test_a_resumed_run_continues_its_wandb_run(say7, tmp_path, monkeypatch):
    """--load continues the W&B run saved in the checkpoint: same run id, and the steps after the checkpoint
    land in it."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    root, model, data = say7
    run_dir, save = tmp_path / "run", tmp_path / "ckpt"

    def argv(num_rollout: int) -> list[str]:
        return flags(model, data, run_dir, save, num_rollout, "--use-wandb", "--wandb-mode", "offline",
                     "--wandb-project", "sluice-test", "--load", str(save), "--save-interval", "1")

    run_loop(argv(2))
    (first,) = (run_dir / "wandb").glob("offline-run-*")

    def run_id(run: Path) -> str:  # offline-run-<date>_<time>-<id>, plus "-1" when two start in the same second
        return re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", run.name).group(1)

    run_loop(argv(4))  # resumes after rollout 1 and runs steps 3 and 4
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {run_id(r) for r in runs} == {run_id(first)}
    (second,) = [r for r in runs if r != first]
    (log_file,) = second.glob("run-*.wandb")
    steps = {record.history.step.num for record in read_wandb_records(log_file)
             if record.WhichOneof("record_type") == "history"}
    assert steps == {3, 4}
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_sluice_plot_renders_every_panel_and_an_html_summary(tmp_path, capsys):
    from sluice.cli import main

    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir) as writer:
        writer.log({"eval/add/accuracy": 0.1, "eval/add/reward_mean": 0.1}, step=0)
        for step in range(1, 6):
            writer.log({"rollout/reward_mean": step / 10, "rollout/accuracy": step / 10, "train/loss": 1 / step,
                        "rollout/response_len_mean": 4.0 + step, "rollout/response_len_min": 1.0,
                        "rollout/response_len_max": 9.0 + step, "rollout/response_len_p50": 4.0,
                        "rollout/response_len_p90": 8.0, "rollout/response_len_p99": 9.0, "train/ppo_kl": 0.01 * step,
                        "train/entropy": 2.0 - step / 10, "train/grad_norm": 0.5, "train/clipfrac": 0.1,
                        "perf/rollout_time_s": 1.0, "perf/train_time_s": 2.0, "perf/sync_time_s": 0.1,
                        "perf/step_time_s": 3.1, "perf/rollout_tokens_per_s": 100.0 * step,
                        "perf/train_tokens_per_s": 300.0, "eval/add/accuracy": step / 5}, step=step)
    assert main(["plot", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["reward.png", "response_length.png", "kl_entropy.png", "optimization.png", "throughput.png",
             "stage_time.png"]
    for name in names:
        png = run_dir / "plots" / name
        assert str(png) in printed
        assert png.read_bytes()[:8] == PNG_MAGIC and len(png.read_bytes()) > 5000, name
    page = (run_dir / "summary.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('src="data:image/png;base64,') == len(names) + 1  # + the overview
    for name in names:
        assert f'href="plots/{name}"' in page
    # the table holds each metric's latest value and the step it was logged at
    assert "<tr><td>eval/add/accuracy</td><td class=\"num\">5</td><td class=\"num\">1</td></tr>" in page
    assert "<tr><td>eval/add/reward_mean</td><td class=\"num\">0</td><td class=\"num\">0.1</td></tr>" in page
    from html.parser import HTMLParser

    HTMLParser().feed(page)  # parses
