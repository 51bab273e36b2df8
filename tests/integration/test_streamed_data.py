"""A training run over a prompt set large enough to stream (parquet shards): it starts without converting the
set, trains, and a run resumed mid-epoch draws exactly the rows an uninterrupted run draws, shuffled."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluice.checkpoint.rollout_data import load_rollout_data
from sluice.config import parse_config, validate
from sluice.data import EAGER_MAX_ROWS
from sluice.data.source import epoch_permutation
from sluice.demo.model import build_checkpoint
from sluice.loops import train_sync
from sluice.orchestration import build_run

from helpers.train_loop import ROLLOUT_BATCH, SEED, SHAPE, flags

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

NUM_ROWS = EAGER_MAX_ROWS + 10_000
PROMPTS = [f"{i}: say 7" for i in range(NUM_ROWS)]


def write_shards(directory: Path) -> Path:
    directory.mkdir()
    third = NUM_ROWS // 3
    for shard, start in enumerate(range(0, NUM_ROWS, third)):
        rows = pa.table({"input": PROMPTS[start:start + third], "label": ["7"] * len(PROMPTS[start:start + third])})
        pq.write_table(rows, directory / f"train-{shard:05d}-of-00003.parquet", row_group_size=5_000)
    return directory


def trained_prompts(argv: list[str], rollouts: Path, first: int, last: int) -> tuple[list[str], list[str]]:
    """Run ``argv`` (saving rollout data under ``rollouts``); the prompts of rollouts first..last, and the log."""
    log: list[str] = []
    config = parse_config([*argv, "--save-debug-rollout-data", str(rollouts / "{rollout_id}.json")])
    validate(config)
    run = build_run(config, log=log.append)
    try:
        train_sync(run)
    finally:
        run.close()
    prompts = [g.samples[0].prompt for i in range(first, last + 1)
               for g in load_rollout_data(rollouts / f"{i}.json", i)]
    return prompts, log


def test_a_streamed_sharded_run_resumed_mid_epoch_draws_the_rows_of_an_uninterrupted_one(tmp_path: Path) -> None:
    data = write_shards(tmp_path / "shards")
    model = build_checkpoint(tmp_path / "model", shape=SHAPE, seed=SEED)
    straight, log = trained_prompts(flags(model, data, tmp_path / "straight", tmp_path / "ckpt_straight", 4),
                                    tmp_path / "straight_rollouts", 0, 3)
    assert f"{data}: {NUM_ROWS} rows, streamed" in "\n".join(log)
    order = epoch_permutation(NUM_ROWS, SEED, 0)
    assert straight == [PROMPTS[p] for p in order[:4 * ROLLOUT_BATCH]]  # the seeded permutation, row by row
    first, _ = trained_prompts(flags(model, data, tmp_path / "first", tmp_path / "ckpt", 2),
                               tmp_path / "first_rollouts", 0, 1)
    resumed, _ = trained_prompts(flags(model, data, tmp_path / "resumed", tmp_path / "ckpt_resumed", 4,
                                       "--load", str(tmp_path / "ckpt")), tmp_path / "resumed_rollouts", 2, 3)
    assert first + resumed == straight
