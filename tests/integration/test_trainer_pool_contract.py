"""The TrainerPool contract (sluice/orchestration/pools.py), one set of tests run against every trainer pool:

  local   LocalTrainerPool: the trainer in this process; LocalPlacement's in-process engine
  ray-1   RayTrainerPool of one trainer actor; RayPlacement's engine actor behind its HTTP server
  ray-2   RayTrainerPool of two trainer actors, data-parallel over gloo; an engine actor as for ray-1

Every pool is made by its placement's ``start_trainer`` from the same config: the "say 7" checkpoint, one seed, a
KL loss (so a reference model exists), CPU. Every test drives its pool through the interface only and feeds it
the same hand-built rollouts of 8 samples: one optimizer step each, in two padded micro-batches of 4, so each
rank of ray-2 runs one of them. Two gradients summed by an all-reduce are bitwise the sum one process
accumulates (adding two floats commutes), so every pool must reach exactly the weights (checksums) of a fresh
in-process pool trained on the same rollouts, not merely close ones.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from sluice.checkpoint.hf_export import export_hf
from sluice.config import parse_config, validate
from sluice.orchestration.hooks import load_hooks
from sluice.orchestration.local_pools import LocalPlacement
from sluice.orchestration.oom import OomAdvice
from sluice.orchestration.pools import EnginePool, TrainerPool
from sluice.orchestration.ray_placement import RayPlacement
from sluice.sync.verify import checksum_differences, engine_checksums, expected_checksums
from sluice.trainer.held_out import HeldOutLoss
from sluice.types import Sample, SampleGroup, Status

from helpers.train_loop import flags
from helpers.trainer import PAD, random_samples

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

GROUP_SIZE = 4
REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]  # both groups have a signal: every advantage is non-zero
KL = "train/kl_loss"


def rollout(seed: int) -> tuple[list[SampleGroup], list[list[float]]]:
    """Two groups of 4 samples of mixed lengths (one with a tool-output hole in its loss mask) and their rewards."""
    samples, _ = random_samples(len(REWARDS) * GROUP_SIZE, seed)
    for index, sample in enumerate(samples):
        sample.group_index, sample.index, sample.status = index // GROUP_SIZE, index, Status.COMPLETED
    groups = [SampleGroup(samples[g * GROUP_SIZE : (g + 1) * GROUP_SIZE]) for g in range(len(REWARDS))]
    return groups, REWARDS


def train(pool: TrainerPool, seed: int) -> dict[str, float]:
    return pool.train(*rollout(seed), train_actor=True)


def held_out_samples() -> list[Sample]:
    return [sample for group in rollout(seed=6)[0] for sample in group.samples]


@pytest.fixture(scope="module")
def argv(say7, tmp_path_factory) -> list[str]:
    root, model, data = say7
    run = tmp_path_factory.mktemp("trainer_pools")
    return flags(model, data, run / "run", run / "ckpt", 1, "--rollout-batch-size", str(len(REWARDS)),
                 "--n-samples-per-prompt", str(GROUP_SIZE), "--no-use-dynamic-batch-size", "--micro-batch-size",
                 str(GROUP_SIZE), "--use-kl-loss", "--kl-loss-coef", "0.1")


def config_of(argv: list[str], *extra: str):
    config = parse_config([*argv, *extra])
    validate(config)
    return config


@dataclass
class Placed:
    """One kind of trainer pool, made twice by its placement, and its placement's engines."""

    pool: TrainerPool
    fresh: TrainerPool  # a second pool of the same kind, for restores
    engines: EnginePool
    read_engine: Callable[[EnginePool], tuple[int, dict[str, int]]]  # (weight version, checksums) of the engine


def local_engine_weights(engines: EnginePool) -> tuple[int, dict[str, int]]:
    return engines.engine.weight_checksums()


def served_engine_weights(engines: EnginePool) -> tuple[int, dict[str, int]]:
    (url,) = engines.urls
    return asyncio.run(engine_checksums(url))


@pytest.fixture(scope="module")
def ray_cluster():
    # CPU bundles on any machine; ray-2 holds the most: two placements of 2 trainer bundles and 1 engine bundle
    ray.init(num_cpus=6, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def start_local(argv: list[str]) -> tuple[list[Any], Placed]:
    config = config_of(argv, "--orchestrator", "local")
    hooks = load_hooks(config)
    placements = [LocalPlacement(config, OomAdvice(config)) for _ in range(2)]
    engines = placements[0].start_engines()
    pools = [placement.start_trainer(None, hooks, PAD) for placement in placements]
    return placements, Placed(pools[0], pools[1], engines, local_engine_weights)


def start_ray(argv: list[str], num_ranks: int) -> tuple[list[Any], Placed]:
    config = config_of(argv, "--orchestrator", "ray", "--actor-num-gpus-per-node", str(num_ranks))
    hooks = load_hooks(config)
    placements = [RayPlacement(config, log=lambda line: None) for _ in range(2)]
    with ThreadPoolExecutor(3) as starting:  # the actors' processes start side by side
        engines = starting.submit(placements[0].start_engines)
        pools = [starting.submit(placement.start_trainer, None, hooks, PAD) for placement in placements]
        return placements, Placed(pools[0].result(), pools[1].result(), engines.result(), served_engine_weights)


@pytest.fixture(scope="module", params=["local", "ray-1", "ray-2"])
def placed(request, argv):
    if request.param == "local":
        placements, placed = start_local(argv)
    else:
        request.getfixturevalue("ray_cluster")
        placements, placed = start_ray(argv, num_ranks=int(request.param.removeprefix("ray-")))
    yield placed
    for placement in placements:
        placement.shutdown()


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as a checkpoint file holds it: copied out, so later steps of its pool cannot change it (the
    in-process pool's state_dict shares the live tensors of the model and optimizer)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@dataclass
class Reference:
    start: dict[str, Any]  # the state of a pool fresh from the checkpoint (a snapshot)
    first: dict[str, float]  # metrics of the first step from the checkpoint (rollout 0)
    first_checksums: dict[str, int]
    second: dict[str, float]  # then rollout 1
    second_checksums: dict[str, int]
    held_out: HeldOutLoss  # the fresh pool's loss on held_out_samples()


@pytest.fixture(scope="module")
def reference(argv) -> Reference:
    """Two steps of a fresh in-process pool: what every pool must reproduce."""
    config = config_of(argv, "--orchestrator", "local")
    pool = LocalPlacement(config, OomAdvice(config)).start_trainer(None, load_hooks(config), PAD)
    start = snapshot(pool.state_dict())
    held_out = pool.held_out_loss(held_out_samples())
    first = train(pool, seed=0)
    first_checksums = pool.weight_checksums()
    return Reference(start, first, first_checksums, train(pool, seed=1), pool.weight_checksums(), held_out)


def assert_same_step(got: dict[str, float], expected: dict[str, float]) -> None:
    """The same metric keys, and the same values up to float32 rounding."""
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


# ------------------------------------------------------------------------------------------------ train
def test_train_reaches_the_in_process_metrics_and_weights(placed, reference):
    """From the in-process pool's fresh state (so whatever the other tests trained before is undone), two steps:
    each step's metrics and the weights after it are the in-process pool's."""
    pool = placed.pool
    pool.load_state_dict(reference.start)
    first = train(pool, seed=0)
    assert first["train/grad_norm"] > 0 and first[KL] == 0.0  # the policy is still the reference
    assert_same_step(first, reference.first)
    assert pool.weight_checksums() == reference.first_checksums
    second = train(pool, seed=1)
    assert second[KL] != 0.0  # the policy moved away from the reference (k1 takes either sign)
    assert_same_step(second, reference.second)
    assert pool.weight_checksums() == reference.second_checksums != reference.first_checksums


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_restored_pool_has_the_weights_and_takes_the_next_step_of_the_original(placed):
    pool, fresh = placed.pool, placed.fresh
    train(pool, seed=2)
    fresh.load_state_dict(snapshot(pool.state_dict()))
    assert fresh.weight_checksums() == pool.weight_checksums()
    continued, restored = train(pool, seed=3), train(fresh, seed=3)  # AdamW's moments and step count came along
    assert continued == restored
    assert fresh.weight_checksums() == pool.weight_checksums()


# ------------------------------------------------------------------------------------------ held-out loss
def test_held_out_loss_is_the_in_process_pools_and_changes_no_weight(placed, reference):
    """The SFT loss of held-out samples (--eval-sft-data) from the fresh state: the in-process pool's on every pool
    (two ranks each run half of the forward passes), and a forward pass only."""
    pool = placed.pool
    pool.load_state_dict(reference.start)
    before = pool.weight_checksums()
    got = pool.held_out_loss(held_out_samples())
    assert got.num_tokens == reference.held_out.num_tokens > 0
    assert got.nll_sum == pytest.approx(reference.held_out.nll_sum, rel=1e-5) and got.nll_sum > 0
    assert pool.weight_checksums() == before


# -------------------------------------------------------------------------------------------- reference
def test_update_reference_makes_the_current_policy_the_kl_reference(placed):
    pool = placed.pool
    train(pool, seed=4)
    assert train(pool, seed=5)[KL] != 0.0  # trained past its reference
    pool.update_reference()
    after = train(pool, seed=5)
    # one optimizer step per rollout: its forward runs before the step, on weights equal to the new reference
    assert after[KL] == 0.0
    assert train(pool, seed=5)[KL] != 0.0


# ------------------------------------------------------------------------------------------ weight sync
def test_push_weights_gives_the_engines_the_trainers_weights_and_version(placed):
    pool, engines = placed.pool, placed.engines
    train(pool, seed=6)
    version_before, before = placed.read_engine(engines)
    version = version_before + 3
    assert checksum_differences(pool.weight_checksums(), before) != []  # the engine holds older weights
    pool.connect_engines(engines)
    metrics = asyncio.run(pool.push_weights(version))
    assert metrics["sync/bytes"] > 0
    pushed_version, pushed = placed.read_engine(engines)
    assert pushed_version == version and asyncio.run(engines.client.weight_version()) == version
    assert pushed and checksum_differences(pool.weight_checksums(), pushed) == []


# ----------------------------------------------------------------------------------------------- export
def test_model_exports_to_a_directory_transformers_loads_with_the_pools_weights(placed, tmp_path):
    pool = placed.pool
    train(pool, seed=7)
    path = export_hf(pool.model, None, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    exported = expected_checksums(loaded.state_dict())
    trainer = pool.weight_checksums()
    assert set(exported) == set(trainer)
    assert checksum_differences(trainer, exported) == []


# ------------------------------------------------------------------------------------------- offloading
def test_offload_and_onload_keep_the_weights_and_training_unchanged(placed):
    pool, fresh = placed.pool, placed.fresh
    train(pool, seed=8)
    state, weights = snapshot(pool.state_dict()), pool.weight_checksums()
    pool.offload()
    pool.onload()
    assert pool.weight_checksums() == weights
    fresh.load_state_dict(state)
    assert train(pool, seed=9) == train(fresh, seed=9)
    assert pool.weight_checksums() == fresh.weight_checksums() != weights
