"""Which directory a run writes its records to, checked before anything loads.

A run directory belongs to one run. A new run refuses a directory holding another run's records (its metrics
would otherwise interleave with the earlier run's: steps 1, 2, 1, 2), unless ``--load`` resumes that very run
(its checkpoint records this run directory, or the directory's config.yaml names the --save that --load points
at) or ``--overwrite-run-dir`` asks for the old records to be deleted. A new run likewise refuses a --save
directory that already holds checkpoints: its saves would replace the earlier run's one by one.

Without --run-dir a run gets a fresh ``runs/<date>-<time>`` (``runs/latest`` links to the newest), and a resume
without --run-dir continues in the run directory its checkpoint records.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sluice.checkpoint.store import find_latest
from sluice.config import Config, ConfigError
from sluice.observability.metrics import METRICS_FILE
from sluice.observability.report import PLOTS_DIR, SUMMARY_FILE
from sluice.observability.run_record import COMMANDS_FILE, RUN_CONFIG_FILE, read_run_config
from sluice.observability.samples import SAMPLES_FILE
from sluice.orchestration.resume import resume_checkpoint

RUNS_ROOT = Path("runs")
LATEST_LINK = "latest"
# Records of finished steps: a directory holding either (not empty) holds a run. A run that stopped before its
# first step left nothing worth keeping, and a new run may start there.
STEP_RECORDS = (METRICS_FILE, SAMPLES_FILE)
# Everything a run writes in its directory: what the refusal lists and --overwrite-run-dir deletes.
RUN_FILES = (METRICS_FILE, SAMPLES_FILE, RUN_CONFIG_FILE, COMMANDS_FILE, SUMMARY_FILE, "curves.png")
RUN_DIRS = (PLOTS_DIR, "tensorboard", "wandb")


def earlier_run_records(run_dir: Path) -> list[str]:
    """The names of an earlier run's records in ``run_dir`` (files, then directories as ``name/``); empty when
    it holds no step records (see STEP_RECORDS)."""
    if not any((run_dir / name).is_file() and (run_dir / name).stat().st_size > 0 for name in STEP_RECORDS):
        return []
    return ([name for name in RUN_FILES if (run_dir / name).is_file()]
            + [f"{name}/" for name in RUN_DIRS if (run_dir / name).is_dir()])


def _checkpoint_run_dir(checkpoint: Path) -> str | None:
    """The run directory a checkpoint's config.yaml records (None: none recorded); a checkpoint keeps its config
    under the same file name as a run directory does."""
    return (read_run_config(checkpoint) or {}).get("run_dir")


def _same(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _resumes_here(run_dir: Path, load: str, checkpoint: Path | None) -> bool:
    """Whether --load continues the run whose records ``run_dir`` holds."""
    if checkpoint is not None:
        return _same(_checkpoint_run_dir(checkpoint), run_dir)
    recorded = read_run_config(run_dir) or {}  # no checkpoint yet: a relaunch after a crash before the first save
    return _same(recorded.get("save"), load)


def _reserve_timestamped_dir(now: datetime.datetime) -> Path:
    """Create a new, empty runs/<date>-<time>; a suffix -2, -3, ... when runs start within the same second.

    Created here, not planned: two runs launched together (a sweep) must never share a directory, and only the
    creation itself is atomic. ``RunDirPlan.release`` removes it again if the run stops before it writes there.
    """
    base = RUNS_ROOT / now.strftime("%Y%m%d-%H%M%S")
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    candidate, number = base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1
            candidate = base.with_name(f"{base.name}-{number}")


def _refusal(run_dir: Path, records: list[str], config: Config, checkpoint: Path | None) -> str:
    load = config.checkpoint.load
    message = f"--run-dir {run_dir} already holds another run's records ({', '.join(records)})"
    overwrite = "or --overwrite-run-dir to delete those records first"
    if load is None:
        saved_to = (read_run_config(run_dir) or {}).get("save")
        resume = (f"resume that run with --load {saved_to}" if saved_to else
                  "that run saved no checkpoints (no --save), so it cannot be resumed")
        return (f"{message}: {resume}; for a new run choose another --run-dir (or leave it out for a new "
                f"{RUNS_ROOT}/<date>-<time>), {overwrite}")
    if checkpoint is not None:
        recorded = _checkpoint_run_dir(checkpoint)
        owner = f"the checkpoint {checkpoint} was saved by the run of --run-dir {recorded}"
        where = f"--run-dir {recorded}" if recorded else "another --run-dir"
    else:
        owner = f"{run_dir / RUN_CONFIG_FILE} does not name --save {load}"
        where = "another --run-dir"
    return f"{message}, and --load {load} does not resume that run ({owner}): pass {where}, {overwrite}"


def _check_save_dir(config: Config) -> None:
    """A new run (no --load) must not save into a --save directory holding another run's checkpoints."""
    save = config.checkpoint.save
    if save is None or config.checkpoint.load is not None:
        return
    try:
        latest = find_latest(save)
    except FileNotFoundError:  # a broken `latest`: still another run's directory
        latest = Path(save) / "latest"
    if latest is not None:
        raise ConfigError(f"--save {save} already holds checkpoints of another run (latest: {latest.name}): resume "
                          f"that run with --load {save}, or choose another --save (a new run would replace its "
                          "checkpoints one by one)")


@dataclass
class RunDirPlan:
    """Where the run writes, decided before anything is written (``plan_run_dir``); ``apply`` makes it so."""

    run_dir: Path
    checkpoint: Path | None  # the checkpoint --load resumes from; None: a new start
    earlier_records: list[str]  # to delete first (--overwrite-run-dir)
    link_latest: bool  # a default run directory: runs/latest is pointed at it

    def apply(self, log: Callable[[str], None]) -> None:
        """Delete the earlier records (if any), create the directory, point runs/latest at it."""
        if self.earlier_records:
            for name in self.earlier_records:
                path = self.run_dir / name.rstrip("/")
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            log(f"--overwrite-run-dir: deleted the earlier run's {', '.join(self.earlier_records)} in {self.run_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.link_latest:
            _point_latest(self.run_dir, log)

    def release(self) -> None:
        """Remove a default run directory the run stopped before writing to (a mistake found by a later check)."""
        if self.link_latest:
            for directory in (self.run_dir, self.run_dir.parent):  # runs/ too, if this run made it
                try:
                    directory.rmdir()  # only if empty
                except OSError:
                    return


def plan_run_dir(config: Config, now: datetime.datetime | None = None) -> tuple[Config, RunDirPlan]:
    """The config with its run directory resolved, and the plan for that directory. Raises ConfigError when the
    directory (or --save) holds another run, having written nothing. Writes nothing else either, except that a
    default directory (no --run-dir) is created empty, to reserve it."""
    ckpt, logging = config.checkpoint, config.logging
    checkpoint = resume_checkpoint(ckpt.load, ckpt.save) if ckpt.load else None
    _check_save_dir(config)
    given = logging.run_dir
    if given is None and checkpoint is not None:
        given = _checkpoint_run_dir(checkpoint)
    run_dir = Path(given) if given is not None else _reserve_timestamped_dir(now or datetime.datetime.now())
    # Absolute in the resolved config (and so in config.yaml and each checkpoint): a resume launched from another
    # working directory continues in this directory, not in a new relative one beside it.
    run_dir = run_dir.absolute()
    records = earlier_run_records(run_dir)
    if records and ckpt.load and _resumes_here(run_dir, ckpt.load, checkpoint):
        records = []  # the resumed run's own records: continued, not replaced
    if records and not logging.overwrite_run_dir:
        raise ConfigError(_refusal(run_dir, records, config, checkpoint))
    resolved = dataclasses.replace(config, logging=dataclasses.replace(logging, run_dir=str(run_dir)))
    return resolved, RunDirPlan(run_dir, checkpoint, records, link_latest=given is None)


def _point_latest(run_dir: Path, log: Callable[[str], None]) -> None:
    """runs/latest -> the new run directory (a relative link, so the runs/ folder can move as a whole)."""
    link = run_dir.parent / LATEST_LINK
    if link.exists() and not link.is_symlink():
        log(f"{link} is a directory of its own (an earlier sluice's default run directory), so it was left as it "
            f"is; this run's directory is {run_dir}")
        return
    staged = run_dir.parent / f".{LATEST_LINK}.{os.getpid()}"
    staged.unlink(missing_ok=True)
    staged.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(staged, link)  # atomic: a reader never finds runs/latest missing
