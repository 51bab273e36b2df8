"""The plots as data: which panels a sync and an async run get, which series each axis holds, the reward band,
the smoothing, and colours that do not depend on the run."""

from __future__ import annotations

import pytest

from sluice.observability import plot_panels
from sluice.observability.plot_data import STAGE_COLOURS, ema, metric_colour, smoothing_weight

NUM_STEPS = 40  # enough points to be smoothed


def sync_records(num_steps: int = NUM_STEPS) -> list[dict]:
    """Metrics as the synchronous loop logs them (the keys of a real run, made-up values)."""
    return [{"step": step, "rollout/reward_mean": step / num_steps, "rollout/reward_std": 0.1,
             "rollout/accuracy": step / num_steps, "rollout/zero_std_group_fraction": 0.5,
             "rollout/truncated_frac": 0.0, "rollout/staleness_mean": 0.0, "rollout/staleness_max": 0.0,
             "train/loss": 0.01, "train/pg_loss": 0.01, "train/grad_norm": 0.5, "train/clipfrac": 0.0,
             "train/ppo_kl": 0.0, "train/entropy": 2.0, "train/rollout_logprob_abs_diff": 2e-7,
             "train/rollout_policy_kl": 3e-14, "train/ref_kl": 0.01 * step, "train/kl_loss": 0.02 * step,
             "perf/rollout_time_s": 1.0, "perf/train_time_s": 2.0, "perf/sync_time_s": 0.1, "perf/step_time_s": 3.1,
             "perf/rollout_idle_frac": 0.6, "perf/train_idle_frac": 0.3, "perf/rollout_tokens_per_s": 100.0,
             "perf/train_tokens_per_s": 300.0}
            for step in range(1, num_steps + 1)]


def async_records() -> list[dict]:
    """The async loop's: a wait stage instead of rollout, staleness above 0, no reference model."""
    records = []
    for record in sync_records():
        record = {k: v for k, v in record.items() if k not in ("perf/rollout_time_s", "train/ref_kl", "train/kl_loss")}
        record.update({"perf/wait_time_s": 0.2, "rollout/staleness_mean": 0.5, "rollout/staleness_max": 1.0})
        records.append(record)
    return records


def titles(plot) -> list[str]:
    return [panel.title for panel in plot.panels]


def test_a_sync_run_gets_stage_times_and_idle_fractions_but_no_staleness_panel():
    plot = plot_panels.pipeline(sync_records())
    assert titles(plot) == ["time per step by stage", "idle fraction of each pool"]
    bars = plot.axis("time per step by stage")
    assert [(stage, colour) for stage, _, colour in bars.layers] == [
        ("rollout", STAGE_COLOURS["rollout"]), ("train", STAGE_COLOURS["train"]), ("sync", STAGE_COLOURS["sync"])]
    assert plot.axis("idle fraction of each pool").keys == ["perf/rollout_idle_frac", "perf/train_idle_frac"]


def test_an_async_run_also_gets_a_staleness_panel_and_its_wait_stage():
    plot = plot_panels.pipeline(async_records())
    assert titles(plot) == ["time per step by stage", "idle fraction of each pool", "staleness of the trained samples"]
    assert [stage for stage, _, _ in plot.axis("time per step by stage").layers] == ["wait", "train", "sync"]
    staleness = plot.axis("staleness of the trained samples")
    assert staleness.keys == ["rollout/staleness_mean", "rollout/staleness_max"]
    assert staleness.lines[1].values == (1.0,) * NUM_STEPS


def test_the_kl_panel_holds_the_reference_kl_and_the_rollout_policy_kl_each_on_its_own_scale():
    plot = plot_panels.kl_entropy(sync_records())
    assert plot.axis("KL to the reference").keys == ["train/ref_kl", "train/kl_loss"]
    drift = plot.axis("policy drift")
    assert [line.key for line in drift.lines] == ["train/rollout_policy_kl", "train/ppo_kl"]
    # the logprob gap (1e-7) is a different quantity: on the twin axis, not flattening the KL lines
    assert [line.key for line in drift.right] == ["train/rollout_logprob_abs_diff"]
    without_ref = plot_panels.kl_entropy(async_records()).axis("KL to the reference")
    assert without_ref.lines == () and "no reference model" in without_ref.empty_note


def test_the_clip_fraction_no_longer_shares_an_axis_with_the_logprob_gap():
    plot = plot_panels.optimization(sync_records())
    assert titles(plot) == ["loss", "gradient norm", "clip fractions"]
    assert plot.axis("clip fractions").keys == ["train/clipfrac"]
    assert all("train/rollout_logprob_abs_diff" not in panel.keys for panel in plot.panels)


def test_the_reward_panel_has_a_mean_plus_minus_std_band_and_the_signal_fractions():
    records = sync_records()
    plot = plot_panels.rewards(records)
    reward = plot.axis("rollout reward")
    (band,) = reward.bands
    assert band.low[4] == pytest.approx(records[4]["rollout/reward_mean"] - 0.1)
    assert band.high[4] == pytest.approx(records[4]["rollout/reward_mean"] + 0.1)
    assert plot.axis("fractions of the rollout batch").keys == [
        "rollout/accuracy", "rollout/zero_std_group_fraction", "rollout/truncated_frac"]
    assert titles(plot) == ["rollout reward", "fractions of the rollout batch"]  # no eval points, no eval panel
    with_eval = records + [{"step": 0, "eval/say7/accuracy": 0.5, "eval/say7/reward_mean": 0.5}]
    evals = plot_panels.rewards(with_eval).axis("eval")
    assert [line.key for line in evals.lines] == ["eval/say7/accuracy"]
    assert [line.key for line in evals.right] == ["eval/say7/reward_mean"]  # its own scale, on the right


def test_lines_on_one_axis_differ_in_dash_and_marker():
    drift = plot_panels.kl_entropy(sync_records()).axis("policy drift")
    styles = [(line.dash, line.marker) for line in drift.lines + drift.right]
    assert len(set(styles)) == len(styles) == 3


def test_long_series_are_smoothed_short_ones_are_not():
    (line,) = plot_panels.reward_axis(sync_records()).lines
    assert line.smoothed is not None and line.smoothed != line.values
    (short,) = plot_panels.reward_axis(sync_records(num_steps=5)).lines
    assert short.smoothed is None
    assert smoothing_weight(20) == 0.0 and smoothing_weight(60) == pytest.approx(0.5)
    assert smoothing_weight(10_000) == 0.9
    # debiased: a constant series stays that constant from the first point; by hand for 0, 1 at weight 0.5
    assert ema([2.0, 2.0, 2.0], 0.5) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_colours_are_fixed_per_metric_and_stage_whatever_else_the_run_logs():
    alone = plot_panels.kl_entropy([{"step": 1, "train/rollout_policy_kl": 0.1}]).axis("policy drift")
    crowded = plot_panels.kl_entropy(sync_records()).axis("policy drift")
    assert alone.lines[0].colour == crowded.lines[0].colour == metric_colour("train/rollout_policy_kl")
    assert metric_colour("perf/train_tokens_per_s") == metric_colour("perf/train_idle_frac") == STAGE_COLOURS["train"]
    # metrics without a table entry: a hash of the name, so the same in every run and process
    assert metric_colour("eval/gsm8k/accuracy") == metric_colour("eval/gsm8k/reward_mean") == "#000000"
    assert len(set(STAGE_COLOURS.values())) == len(STAGE_COLOURS)


@pytest.mark.parametrize("records", [sync_records(), async_records(), []], ids=["sync", "async", "empty"])
def test_every_report_panel_draws_a_png(records, tmp_path):
    from sluice.observability.plots import REPORT_PANELS

    for name, (draw, _) in REPORT_PANELS.items():
        assert draw(records, tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
