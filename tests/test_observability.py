"""metrics.jsonl round trips, curve plots, and the console progress reporter."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from sluice.observability import MetricsWriter, ProgressReporter, plot_curves, read_metrics

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


def test_metrics_writer_resuming_drops_steps_past_the_checkpoint(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(5):
            writer.log({"rollout/reward_mean": step / 10}, step=step)
    with MetricsWriter(tmp_path, resume_after_step=2) as writer:
        writer.log({"rollout/reward_mean": 0.9}, step=3)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["rollout/reward_mean"] == 0.9
