"""The Ray path on a GPU: trainer and engine actors colocated on one GPU (fractional GPU bundles), weights pushed
by CUDA IPC, the synchronous and the asynchronous loop. Runs where CUDA and Ray both exist (the GPU machine).

Learning is checked by the CPU Ray tests (test_ray_run.py); here every step trains and syncs, and the engine ends
with the trainer's exact weights."""

from __future__ import annotations

import asyncio

import pytest
import torch

from sluice.config import parse_config, validate
from sluice.loops import train
from sluice.observability.metrics import read_metrics
from sluice.orchestration import build_run
from sluice.orchestration.ray_placement import RayPlacement
from sluice.sync.verify import checksum_differences, engine_checksums
from helpers.train_loop import flags

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")]
NUM_ROLLOUT = 8


@pytest.fixture(scope="module")
def ray_with_gpu():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    assert ray.cluster_resources().get("GPU", 0) >= 1
    yield
    ray.shutdown()


def gpu_flags(root, model, data, name: str, *extra: str) -> list[str]:
    argv = flags(model, data, root / name / "run", root / name / "ckpt", NUM_ROLLOUT, "--orchestrator", "ray",
                 "--colocate", "--sglang-max-total-tokens", "4096", "--sglang-dtype", "float32", *extra)
    for flag in ("--train-device", "--sglang-device"):
        argv[argv.index(flag) + 1] = "cuda"
    return argv


@pytest.mark.parametrize("extra", [[], ["--async", "--use-rollout-logprobs"]], ids=["sync", "async"])
def test_colocated_run_on_one_gpu(ray_with_gpu, say7, extra):
    root, model, data = say7
    config = parse_config(gpu_flags(root, model, data, "gpu_" + ("async" if extra else "sync"), *extra))
    validate(config)
    run = build_run(config, log=lambda line: None)
    assert isinstance(run.placement, RayPlacement) and run.placement.use_gpus
    try:
        train(run)
        trainer_sums = run.trainer.weight_checksums()
        version, sums = asyncio.run(engine_checksums(run.engines.urls[0], api_key=run.engines.api_key))
    finally:
        run.close()
    # by CUDA IPC; the engine keeps float32 weights here, so its bytes equal the trainer's
    assert version == NUM_ROLLOUT and checksum_differences(trainer_sums, sums) == []
    records = read_metrics(root / ("gpu_" + ("async" if extra else "sync")) / "run" / "metrics.jsonl")
    trained = [r for r in records if "train/loss" in r]
    assert len(trained) == NUM_ROLLOUT and all(r["sync/bytes"] > 0 for r in trained)
    assert all(0.0 <= r["rollout/reward_mean"] <= 1.0 and r["train/grad_norm"] > 0 for r in trained)
