"""Run directories through `sluice train`: another run's records are refused before anything is written, a
default runs/<date>-<time> with runs/latest, --overwrite-run-dir, the config and command line recorded and shown
in summary.html, a resume that continues the same files, and example samples on the console and in the report
from the sync and the async loop."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pytest
import yaml

from sluice.cli import main
from sluice.config import config_to_dict, parse_config
from sluice.observability.metrics import MetricsWriter, read_metrics
from sluice.observability.run_record import read_launches
from sluice.observability.samples import read_samples

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


def write_data(path: Path) -> Path:
    # markup in the prompts: the report must escape it
    path.write_text("".join(json.dumps({"input": f"<b>say {i}</b> & go", "label": str(i)}) + "\n" for i in range(4)))
    return path


def flags(checkpoint, data, *extra: str) -> list[str]:
    return ["train", "--hf-checkpoint", str(checkpoint), "--prompt-data", str(data), "--label-key", "label",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "3",
            "--num-rollout", "2", "--rm-type", "exact", "--train-device", "cpu", "--sglang-device", "cpu",
            "--no-progress-bar", *extra]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_a_run_dir_holding_another_run_is_refused_before_anything_is_written(tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir) as writer:
        writer.log({"rollout/reward_mean": 0.5}, step=1)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"save": str(tmp_path / "ckpt")}))
    before = snapshot(tmp_path)
    assert main(flags(tiny_checkpoint, data, "--run-dir", str(run_dir))) == 2
    err = capsys.readouterr().err
    assert (f"sluice train: error: --run-dir {run_dir} already holds another run's records (metrics.jsonl, "
            f"config.yaml): resume that run with --load {tmp_path / 'ckpt'}; for a new run choose another --run-dir "
            "(or leave it out for a new runs/<date>-<time>), or --overwrite-run-dir to delete those records first") in err
    assert snapshot(tmp_path) == before  # nothing written, nothing loaded into a new file

    # A --save that already holds checkpoints: refused as well (its saves would replace them one by one).
    save = tmp_path / "old_ckpt"
    (save / "rollout_000003").mkdir(parents=True)
    (save / "latest").write_text("rollout_000003")
    before = snapshot(tmp_path)
    assert main(flags(tiny_checkpoint, data, "--run-dir", str(tmp_path / "new"), "--save", str(save))) == 2
    assert (f"--save {save} already holds checkpoints of another run (latest: rollout_000003): resume that run with "
            f"--load {save}, or choose another --save") in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_overwrite_run_dir_deletes_the_earlier_records_and_starts_anew(tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir) as writer:
        for step in (1, 2, 3):
            writer.log({"rollout/reward_mean": 0.5}, step=step)
    (run_dir / "notes.txt").write_text("mine")  # not a run record: kept
    assert main(flags(tiny_checkpoint, data, "--run-dir", str(run_dir), "--overwrite-run-dir")) == 0
    out = capsys.readouterr().out
    assert f"--overwrite-run-dir: deleted the earlier run's metrics.jsonl in {run_dir}" in out
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "notes.txt").read_text() == "mine"
    # config.yaml never records the overwrite: running it again is checked again
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["overwrite_run_dir"] is False
    assert main(["train", "--config", str(run_dir / "config.yaml")]) == 2
    assert f"--run-dir {run_dir} already holds another run's records" in capsys.readouterr().err


def test_default_run_dirs_are_new_each_time_with_runs_latest_linking_the_newest(tiny_checkpoint, tmp_path,
                                                                                monkeypatch, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    assert main(flags(tiny_checkpoint, tmp_path / "missing.jsonl")) == 2  # stopped by a later check ...
    assert not (tmp_path / "runs").exists()  # ... its reserved directory is gone again
    assert main(flags(tiny_checkpoint, data)) == 0
    save = tmp_path / "ckpt"
    assert main(flags(tiny_checkpoint, data, "--save", str(save))) == 0  # a second run, not appended
    capsys.readouterr()
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(runs) == 2
    for run in runs:
        assert [r["step"] for r in read_metrics(run)] == [1, 2]
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == runs[1].name  # relative: runs/ can move as a whole
    # each record names its own directory (a rerun of its config.yaml is refused there)
    # each records its own directory, absolute: a resume launched elsewhere continues there
    assert yaml.safe_load((runs[0] / "config.yaml").read_text())["run_dir"] == str(runs[0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main([*flags(tiny_checkpoint, data, "--save", str(save), "--load", str(save)), "--num-rollout", "3"]) == 0
    assert [r["step"] for r in read_metrics(runs[1])] == [1, 2, 3]  # the run it resumed, not a new one here
    assert list(elsewhere.iterdir()) == []


def test_config_and_command_are_recorded_and_shown_and_a_resume_continues_the_same_files(tiny_checkpoint,
                                                                                          tmp_path, capsys,
                                                                                          monkeypatch):
    data = write_data(tmp_path / "prompts.jsonl")
    run_dir, save = tmp_path / "run", tmp_path / "ckpt"
    first = flags(tiny_checkpoint, data, "--run-dir", str(run_dir), "--save", str(save), "--save-interval", "1")
    assert main(first) == 0

    # config.yaml loads back with --config into the same config
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config_to_dict(parse_config(["--config", str(run_dir / "config.yaml")])) == recorded
    assert recorded["rollout_batch_size"] == 2 and recorded["run_dir"] == str(run_dir)
    (launch,) = read_launches(run_dir)
    assert launch["command"] == ["sluice", *first] and launch["resumed_from"] is None
    for key in ("argv", "sluice_version", "git_commit", "python", "torch", "cwd", "time"):
        assert key in launch, key
    from sluice import __version__

    assert launch["sluice_version"] == __version__

    # the resume: no --run-dir (the checkpoint's is taken), one more step, a changed --lr
    resume = [*flags(tiny_checkpoint, data, "--save", str(save), "--load", str(save), "--lr", "1e-5"), "--num-rollout", "3"]
    assert main(resume) == 0
    assert f"metrics: {run_dir}/metrics.jsonl" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert [r["step"] for r in read_samples(run_dir)] == [1, 1, 2, 2, 3, 3]
    launches = read_launches(run_dir)
    assert len(launches) == 2
    assert launches[1]["resumed_from"] == str(save / "rollout_000001")
    assert launches[1]["changed_settings"]["lr"] == [1e-06, 1e-05]
    assert launches[1]["changed_settings"]["num_rollout"] == [2, 3]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr"] == 1e-05  # the latest launch's config

    page = (run_dir / "summary.html").read_text()
    assert "<h2>Command</h2>" in page and "<h2>Config</h2>" in page
    assert page.count("<pre class=\"command\">") == 2
    assert f"resumed from {save / 'rollout_000001'}" in page
    assert "lr: 1e-06 -&gt; 1e-05" in page
    assert f"torch {launches[0]['torch']}" in page
    assert "rollout_batch_size: 2" in page  # the config.yaml text

    # a --load of this run into another run's directory is refused, naming the run dir the checkpoint belongs to
    other = tmp_path / "other"
    with MetricsWriter(other) as writer:
        writer.log({"rollout/reward_mean": 0.5}, step=1)
    assert main([*resume[:-2], "--num-rollout", "4", "--run-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert (f"--run-dir {other} already holds another run's records (metrics.jsonl), and --load {save} does not "
            f"resume that run (the checkpoint {save / 'rollout_000002'} was saved by the run of --run-dir {run_dir}): "
            f"pass --run-dir {run_dir}") in err

    # a resume the checkpoint refuses (an incompatible setting) leaves the run's records as they were
    before = snapshot(run_dir)
    assert main([*resume[:-2], "--num-rollout", "4", "--rollout-seed", "7"]) == 2
    assert "--rollout-seed: saved 42, now 7" in capsys.readouterr().err
    assert snapshot(run_dir) == before

    # a resume launched from another working directory continues the same run directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main([*resume[:-2], "--num-rollout", "4"]) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert list(elsewhere.iterdir()) == []


def test_keys_on_the_command_line_are_masked_in_commands_jsonl_and_summary_html(tiny_checkpoint, tmp_path,
                                                                                monkeypatch, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    run_dir = tmp_path / "run"
    command = flags(tiny_checkpoint, data, "--run-dir", str(run_dir), "--num-rollout", "1",
                    "--sglang-api-key", "engine-key-1234", "--sglang-admin-api-key=admin-key-5678")
    monkeypatch.setattr("sys.argv", ["sluice", *command, "--api-key", "serve-key-9012"])
    assert main(command) == 0
    capsys.readouterr()
    (launch,) = read_launches(run_dir)
    assert launch["command"][-3:] == ["--sglang-api-key", "***", "--sglang-admin-api-key=***"]
    assert launch["argv"][-5:] == ["--sglang-api-key", "***", "--sglang-admin-api-key=***", "--api-key", "***"]
    assert launch["command"][:4] == ["sluice", "train", "--hf-checkpoint", str(tiny_checkpoint)]  # the rest kept
    records = {name: (run_dir / name).read_text() for name in ("commands.jsonl", "summary.html", "config.yaml")}
    for name, text in records.items():
        for key in ("engine-key-1234", "admin-key-5678", "serve-key-9012"):
            assert key not in text, (name, key)
    assert html.escape("--sglang-api-key '***' '--sglang-admin-api-key=***'") in records["summary.html"]


@pytest.mark.parametrize("loop", [[], ["--async"]], ids=["sync", "async"])
def test_samples_on_the_console_and_in_the_report(loop, tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    run_dir = tmp_path / "run"
    argv = flags(tiny_checkpoint, data, "--run-dir", str(run_dir), "--eval-prompt-data", "held", str(data),
                 "--eval-interval", "2", "--num-logged-samples", "1", *loop)
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  sample ")]
    # one per rollout step and per eval (before training and after step 2), each before its step's line
    assert [line.split(":")[0] for line in lines] == [
        "  sample eval/held step 0", "  sample rollout step 1", "  sample rollout step 2", "  sample eval/held step 2"]
    assert all("prompt='<b>say " in line and " response=" in line and "reward=0" in line for line in lines)
    assert out.index("  sample rollout step 1") < out.index("step 1/2")
    records = read_samples(run_dir)
    assert [(r["step"], r["source"]) for r in records] == [(0, "eval/held"), (1, "rollout"), (2, "rollout"),
                                                          (2, "eval/held")]
    page = (run_dir / "summary.html").read_text()
    assert "<h2>Samples</h2>" in page
    for record in records:  # in full, escaped
        assert f"<pre>{record['prompt'].replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</pre>" in page
    assert "<b>say" not in page


def test_no_logged_samples_with_zero(tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    run_dir = tmp_path / "run"
    assert main(flags(tiny_checkpoint, data, "--run-dir", str(run_dir), "--num-logged-samples", "0")) == 0
    assert "  sample " not in capsys.readouterr().out
    assert not (run_dir / "samples.jsonl").exists()
    assert "<h2>Samples</h2>" not in (run_dir / "summary.html").read_text()
    assert main(flags(tiny_checkpoint, data, "--run-dir", str(tmp_path / "r2"), "--num-logged-samples", "-1")) == 2
    assert "--num-logged-samples must be >= 0 (0: none), got -1" in capsys.readouterr().err


def test_eval_accuracy_threshold_counts_rewards_at_or_above_it(tiny_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl")
    common = ("--eval-prompt-data", "held", str(data), "--eval-interval", "1")
    # the untrained model's rewards are all 0 on exact match: none reaches 1.0, every one reaches 0.0
    assert main(flags(tiny_checkpoint, data, "--run-dir", str(tmp_path / "default"), *common)) == 0
    assert main(flags(tiny_checkpoint, data, "--run-dir", str(tmp_path / "zero"), *common,
                      "--eval-accuracy-threshold", "0")) == 0
    default, zero = read_metrics(tmp_path / "default"), read_metrics(tmp_path / "zero")
    assert [r["eval/held/reward_mean"] for r in default] == [0.0, 0.0, 0.0]
    assert [r["eval/held/accuracy"] for r in default] == [0.0, 0.0, 0.0]
    assert [r["eval/held/accuracy"] for r in zero] == [1.0, 1.0, 1.0]
    assert [r["rollout/accuracy"] for r in zero[1:]] == [1.0, 1.0]
    assert main(flags(tiny_checkpoint, data, "--run-dir", str(tmp_path / "nan"), "--eval-accuracy-threshold",
                      "nan")) == 2
    assert "--eval-accuracy-threshold must be a finite number, got nan" in capsys.readouterr().err


def test_the_demo_runs_again_into_its_own_directory_without_flags(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path / "demo"), "--sft-steps", "1", "--num-rollout", "1",
            "--rollout-batch-size", "2", "--num-train", "8", "--num-eval", "2", "--hidden-size", "32",
            "--intermediate-size", "64", "--num-layers", "1", "--no-progress-bar"]
    assert main(argv) == 0
    assert main(argv) == 0  # the second demo replaces the first one's RL records
    out = capsys.readouterr().out
    rl = tmp_path / "demo" / "rl"
    assert "--overwrite-run-dir: deleted the earlier run's metrics.jsonl" in out
    assert [r["step"] for r in read_metrics(rl)] == [0, 1]
    assert len(read_launches(rl)) == 1 and "--overwrite-run-dir" in read_launches(rl)[0]["command"]
    assert (rl / "summary.html").is_file() and f"summary: {rl / 'summary.html'}" in out  # as README promises
