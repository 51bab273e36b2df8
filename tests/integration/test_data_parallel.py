"""Data-parallel training (trainer/data_parallel.py): 2 real processes train exactly as one process does.

One spawn of 2 ranks over gloo runs every scenario twice, with replicated weights (gradients summed by
data_parallel.py) and sharded by FSDP2 on CPU; the single-process references run in the test process. Each
scenario has an odd number of micro-batches, so the ranks get unequal shares (with FSDP, rank 1 runs a filler).

Tolerances (the ranks add the micro-batch gradients in another order than one process, and the test process
runs with more threads): metrics rel 1e-5 (abs 1e-7 near 0); gradients atol 1e-6 + rtol 1e-5; weights after
the update and logprobs/values atol 1e-6.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.trainer.batching import collate, micro_batch_rows
from sluice.trainer.torch_backend import TorchTrainer
from sluice.trainer.update import update_policy
from sluice.types import SampleGroup, Status, TrainBatch
from helpers.trainer import PAD, random_samples

WORLD_SIZE = 2
# The trainer's ``fsdp`` argument (on CUDA, "fsdp" uses the default) and --optimizer-cpu-offload.
MODES = {"replicated": (False, False), "fsdp": (True, False), "offloaded": (False, True)}
NUM_GROUPS, GROUP_SIZE = 3, 3
MAX_RESPONSE_LEN = 8
CLIP = dict(eps_clip=0.2, eps_clip_high=0.28)


@dataclass(frozen=True)
class Scenario:
    algorithm: AlgorithmConfig
    train: TrainConfig
    global_batch_size: int  # < 9 samples: several optimizer steps, and old logprobs from compute_logprobs


SCENARIOS = {
    # KL to a reference (its logprob pass is split too); 2 optimizer steps of 5 and 4 rows: 3 and 2 micro-batches.
    "grpo_kl": Scenario(AlgorithmConfig(use_kl_loss=True, kl_loss_coef=0.1, **CLIP),
                        TrainConfig(micro_batch_size=2, use_dynamic_batch_size=False, lr=1e-3, clip_grad=1.0, seed=0), global_batch_size=5),
    # Packed rows under a token budget (--use-dynamic-batch-size).
    "packed": Scenario(AlgorithmConfig(**CLIP),
                       TrainConfig(use_dynamic_batch_size=True, max_tokens_per_gpu=24, lr=1e-3, seed=0),
                       global_batch_size=9),
    # PPO: the critic's values and its step are split as well.
    "ppo": Scenario(AlgorithmConfig(advantage_estimator="ppo", **CLIP),
                    TrainConfig(micro_batch_size=3, use_dynamic_batch_size=False, lr=1e-3, seed=0), global_batch_size=9),
}


def rollout() -> tuple[list[SampleGroup], list[list[float]]]:
    """3 groups of 3 samples of different lengths, with engine logprobs and mixed rewards."""
    samples, _ = random_samples(NUM_GROUPS * GROUP_SIZE, seed=11)
    for i, sample in enumerate(samples):
        sample.group_index, sample.index, sample.status = i // GROUP_SIZE, i, Status.COMPLETED
        sample.rollout_log_probs = [-1.0 - 0.1 * j for j in range(sample.response_length)]
    groups = [SampleGroup(samples[g * GROUP_SIZE : (g + 1) * GROUP_SIZE]) for g in range(NUM_GROUPS)]
    rewards = [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.2, 0.9, 0.4]]
    return groups, rewards


def full_batch() -> TrainBatch:
    groups, _ = rollout()
    samples = [s for g in groups for s in g.samples]
    return collate(samples, [0.0] * len(samples), PAD)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def run_scenario(name: str, checkpoint: str, device: str, offload: bool = False, **data_parallel) -> dict:
    """One ``update_policy`` on the rollout, run the same way by one process and by every rank of a pool."""
    scenario = SCENARIOS[name]
    train = replace(scenario.train, train_device=device, optimizer_cpu_offload=offload)
    trainer = TorchTrainer(checkpoint, train, scenario.algorithm, temperature=0.8, **data_parallel)
    batch = full_batch()
    forwards: list[int] = []  # real tokens of each actor forward on this process
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(int((kwargs.get("input_ids", args[0] if args else None) != PAD)
                                                         .sum())), with_kwargs=True)  # HF: input_ids=; native: tokens
    result = {"logprobs": trainer.compute_logprobs(batch), "forwards": list(forwards)}
    if trainer.critic is not None:
        result["values"] = trainer.compute_values(batch)
    grads: list[dict[str, torch.Tensor]] = []  # per optimizer step, as the optimizer is about to use them

    def snapshot(*_) -> None:
        """The gradients the optimizer steps with: the parameters', or with offload the host masters' (one chunk
        here)."""
        named = list(trainer.model.named_parameters())
        stepped = trainer.host.masters if offload else [p for _, p in named]
        grads.append({n: full(t.grad) for (n, _), t in zip(named, stepped)})

    trainer.optimizer.register_step_pre_hook(snapshot)
    groups, rewards = rollout()
    result["metrics"] = update_policy(trainer, groups, scenario.algorithm, rewards, scenario.global_batch_size, PAD,
                                      max_response_len=MAX_RESPONSE_LEN)
    result["grads"] = list(grads)  # the hook stays: later steps are not this update's
    result["weights"] = {n: w.clone() for n, w in trainer.named_weights().items()}
    if trainer.critic is not None:
        result["critic_weights"] = {n: full(w) for n, w in trainer.critic.model.state_dict().items()}
    result["trainer"] = trainer
    return result


def checkpoint_round_trip(trainer: TorchTrainer, checkpoint: str, device: str, state_file: Path,
                          offload: bool = False, **data_parallel) -> dict:
    """state_dict on every rank, saved by rank 0; a fresh trainer loads it on every rank; both take one more step:
    the same weights. Also update_reference: the reference then scores exactly as the actor."""
    state = trainer.state_dict()
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {"state_model_keys": sorted(state["model"]),
           "state_optimizer_entries": len(state["optimizer"].get("state", {}))}  # FSDP: {} off rank 0
    if rank == 0:
        out["state_model"] = {n: t.detach().cpu().clone() for n, t in state["model"].items()}
        torch.save(state, state_file)
    if dist.is_initialized():
        dist.barrier()
    scenario = SCENARIOS["grpo_kl"]
    restored = TorchTrainer(checkpoint, replace(scenario.train, train_device=device, optimizer_cpu_offload=offload),
                            scenario.algorithm, temperature=0.8, **data_parallel)
    restored.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=False))
    batch = full_batch()
    batch.old_log_probs = trainer.compute_logprobs(batch)
    batch.ref_log_probs = trainer.compute_logprobs(batch, reference=True)
    batch.advantages = torch.linspace(-1.0, 1.0, batch.num_samples)[:, None] * batch.loss_mask
    out["continued"] = trainer.train_step(batch, MAX_RESPONSE_LEN)
    out["restored"] = restored.train_step(batch, MAX_RESPONSE_LEN)
    out["continued_weights"] = trainer.named_weights()
    out["restored_weights"] = restored.named_weights()
    trainer.update_reference()
    out["actor_logprobs"] = trainer.compute_logprobs(batch)
    out["reference_logprobs"] = trainer.compute_logprobs(batch, reference=True)
    return out


def rank_main(rank: int, init_method: str, backend: str, device: str, checkpoint: str, out_dir: str) -> None:
    """One rank of the pool: every scenario in every mode; results saved per rank for the test process."""
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # A collective that some rank never enters fails after a minute instead of hanging the test run.
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for mode, (fsdp, offload) in MODES.items():
            fsdp = None if fsdp and device == "cuda" else fsdp
            for name in SCENARIOS:
                result = run_scenario(name, checkpoint, device, offload, process_group=dist.group.WORLD, fsdp=fsdp)
                trainer = result.pop("trainer")
                if name == "grpo_kl":
                    result["checkpoint"] = checkpoint_round_trip(
                        trainer, checkpoint, device, Path(out_dir) / f"{mode}_state.pt", offload,
                        process_group=dist.group.WORLD, fsdp=fsdp)
                    trainer.save_hf(Path(out_dir) / f"{mode}_hf")
                results[mode, name] = result
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_pool(backend: str, device: str, checkpoint: str, out_dir: Path) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(rank_main, args=(f"tcp://127.0.0.1:{port}", backend, device, checkpoint, str(out_dir)),
             nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def single(small_checkpoint, tmp_path_factory) -> dict:
    """The single-process references (no process group): today's trainer."""
    results = {}
    for name in SCENARIOS:
        result = run_scenario(name, small_checkpoint, "cpu")
        trainer = result.pop("trainer")
        if name == "grpo_kl":
            result["checkpoint"] = checkpoint_round_trip(trainer, small_checkpoint, "cpu",
                                                         tmp_path_factory.mktemp("single") / "state.pt")
        results[name] = result
    return results


@pytest.fixture(scope="module")
def pool_dir(small_checkpoint, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pool")


@pytest.fixture(scope="module")
def pool(small_checkpoint, pool_dir) -> list[dict]:
    """Per rank: {(mode, scenario): results} of one 2-process gloo pool."""
    return spawn_pool("gloo", "cpu", small_checkpoint, pool_dir)


# ------------------------------------------------------------------------------------------------- checks
def assert_same_metrics(got: dict[str, float], expected: dict[str, float], rel: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-7), key


def assert_same_tensors(got: dict, expected: dict, atol: float, rtol: float = 0.0) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name].cpu(), value.cpu(), atol=atol, rtol=rtol, msg=name)


def assert_pool_matches_single(ranks: list[dict], single: dict, mode: str, name: str, tolerance: float = 1.0) -> None:
    expected = single[name]
    assert expected["metrics"]["train/loss"] != 0.0 and expected["metrics"]["train/grad_norm"] > 0
    for rank, results in enumerate(ranks):
        got = results[mode, name]
        assert_same_metrics(got["metrics"], expected["metrics"], rel=1e-5 * tolerance)
        torch.testing.assert_close(got["logprobs"], expected["logprobs"], atol=1e-6 * tolerance, rtol=0)
        if "values" in expected:
            torch.testing.assert_close(got["values"], expected["values"], atol=1e-6 * tolerance, rtol=0)
            assert_same_tensors(got["critic_weights"], expected["critic_weights"], atol=1e-6 * tolerance)
        assert len(got["grads"]) == len(expected["grads"]) == expected["metrics"]["train/num_steps"]
        for step_got, step_expected in zip(got["grads"], expected["grads"]):
            assert_same_tensors(step_got, step_expected, atol=1e-6 * tolerance, rtol=1e-5 * tolerance)
        assert_same_tensors(got["weights"], expected["weights"], atol=1e-6 * tolerance)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_two_ranks_update_like_one_process(pool, single, mode, name):
    assert_pool_matches_single(pool, single, mode, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_each_rank_runs_its_share_of_the_micro_batches(pool, single, mode, name):
    """The logprob pass of the 9 rows: micro-batch i on rank i % 2, an odd count; with FSDP rank 1 also runs a
    filler, so both ranks enter as many forwards."""
    micro_batches = micro_batch_rows(full_batch().attention_mask, SCENARIOS[name].train)
    assert len(micro_batches) % 2 == 1 and len(micro_batches) >= 3
    single_forwards = single[name]["forwards"]
    assert len(single_forwards) == len(micro_batches)
    rank_forwards = [results[mode, name]["forwards"] for results in pool]
    assert rank_forwards[0] == single_forwards[0::2]
    if mode == "fsdp":
        assert rank_forwards[1] == single_forwards[1::2] + [single_forwards[-1]]
    else:
        assert rank_forwards[1] == single_forwards[1::2]


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_on_rank_0_resumes_on_every_rank(pool, single, mode):
    expected = single["grpo_kl"]["checkpoint"]
    rank0 = pool[0][mode, "grpo_kl"]["checkpoint"]
    # Rank 0's checkpoint holds the full weights by HF name, as one process's does.
    assert rank0["state_model_keys"] == expected["state_model_keys"]
    assert_same_tensors(rank0["state_model"], expected["state_model"], atol=1e-6)
    assert rank0["state_optimizer_entries"] == expected["state_optimizer_entries"] > 0
    if mode == "fsdp":  # gathered to rank 0 only
        assert pool[1][mode, "grpo_kl"]["checkpoint"]["state_model_keys"] == []
    for results in pool:
        checkpoint = results[mode, "grpo_kl"]["checkpoint"]
        # Restored from rank 0's file, a fresh pool continues exactly as the original one (weights, moments).
        assert_same_metrics(checkpoint["restored"], checkpoint["continued"], rel=1e-6)
        assert_same_tensors(checkpoint["restored_weights"], checkpoint["continued_weights"], atol=1e-7)
        assert_same_tensors(checkpoint["continued_weights"], expected["continued_weights"], atol=1e-6)
        assert_same_metrics(checkpoint["continued"], expected["continued"])
        # update_reference copies the (sharded) actor into the (sharded) reference.
        torch.testing.assert_close(checkpoint["reference_logprobs"], checkpoint["actor_logprobs"], atol=0, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_save_hf_writes_the_full_model_from_rank_0(pool, single, pool_dir, mode):
    model = AutoModelForCausalLM.from_pretrained(pool_dir / f"{mode}_hf", dtype=torch.float32)
    assert model.config.architectures == ["Qwen2ForCausalLM"]
    weights = {n: w for n, w in model.state_dict().items()}
    # Written after the checkpoint check's extra step.
    assert_same_tensors(weights, single["grpo_kl"]["checkpoint"]["continued_weights"], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_with_fsdp_update_like_one_gpu(small_checkpoint, tmp_path):
    """nccl, FSDP2 (the default on CUDA) and replicated, against one GPU; looser tolerance: CUDA kernels (e.g.
    the embedding backward) add in a nondeterministic order."""
    ranks = spawn_pool("nccl", "cuda", small_checkpoint, tmp_path)
    for name in SCENARIOS:
        expected = run_scenario(name, small_checkpoint, "cuda")
        expected.pop("trainer")
        for mode in MODES:
            assert_pool_matches_single(ranks, {name: expected}, mode, name, tolerance=10.0)
