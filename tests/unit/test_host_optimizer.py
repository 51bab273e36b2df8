"""--optimizer-cpu-offload (trainer/host_optimizer.py): host masters and a host AdamW step take the same steps as
the on-device optimizer, keep float32 masters under bf16 device weights, and checkpoint interchangeably.

The host step runs torch's fused CPU AdamW, the device optimizer its foreach kernel: one step apart they differ
by an ulp, so exact comparisons are made against a device optimizer switched to the fused kernel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.trainer import host_optimizer
from sluice.trainer.batching import collate
from sluice.trainer.torch_backend import TorchTrainer
from sluice.types import TrainBatch
from helpers.architectures import build_arch_checkpoint
from helpers.trainer import PAD, random_samples


@pytest.fixture(scope="module", params=["qwen2", "llama3"])  # tied and untied embeddings
def checkpoint(request, tmp_path_factory) -> str:
    return build_arch_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def batch() -> TrainBatch:
    samples, advantages = random_samples(6, seed=1)
    return collate(samples, advantages, PAD)


def _trainer(checkpoint: str, offload: bool, fused: bool = False, **train) -> TorchTrainer:
    # clip_grad 0.5: every step here is clipped (norms of 10-20), so the clipping is compared too.
    config = TrainConfig(lr=1e-2, seed=0, train_device="cpu", clip_grad=0.5, max_tokens_per_gpu=64,
                         optimizer_cpu_offload=offload, **train)
    trainer = TorchTrainer(checkpoint, config, AlgorithmConfig(), temperature=1.0)
    if fused:
        for group in trainer.optimizer.param_groups:
            group["foreach"], group["fused"] = False, True
    return trainer


def _steps(trainer: TorchTrainer, batch: TrainBatch, num_steps: int = 3) -> list[dict[str, float]]:
    metrics = [trainer.train_step(batch) for _ in range(num_steps)]
    assert all(m["train/grad_norm"] > 0.5 for m in metrics)  # the clip was active
    return metrics


@pytest.mark.parametrize("variant", [{}, dict(recompute_granularity="full"), dict(train_model_impl="hf")])
def test_offloaded_steps_equal_the_device_optimizers(checkpoint, batch, monkeypatch, variant):
    """Three steps over several micro-batches: with the fused kernel on both sides, bitwise the same metrics,
    weights and moments, whether the host steps the parameters in one chunk or in many; with recomputed layers
    (the gradient hooks fire in the recomputing backward) and with the HF model class too."""
    device = _trainer(checkpoint, offload=False, fused=True, **variant)
    expected = _steps(device, batch)
    monkeypatch.setattr(host_optimizer, "CHUNK_NUMEL", 2000)  # several chunks, one larger parameter alone
    offloaded = _trainer(checkpoint, offload=True, **variant)
    assert len(host_optimizer._chunks(list(range(len(offloaded.host.masters))), offloaded.host.masters, 2000)) > 3
    assert _steps(offloaded, batch) == expected
    for name, weight in device.named_weights().items():
        assert torch.equal(offloaded.named_weights()[name], weight), name
    device_state, offloaded_state = device.optimizer.state_dict(), offloaded.optimizer.state_dict()
    assert device_state["state"].keys() == offloaded_state["state"].keys()
    for index, moments in device_state["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(offloaded_state["state"][index][key], moments[key])


def test_one_offloaded_step_matches_the_default_optimizer_to_rounding(checkpoint, batch):
    device, offloaded = _trainer(checkpoint, offload=False), _trainer(checkpoint, offload=True)
    assert device.train_step(batch) == pytest.approx(offloaded.train_step(batch), rel=1e-6)
    for name, weight in device.named_weights().items():
        torch.testing.assert_close(offloaded.named_weights()[name], weight, atol=1e-6, rtol=0, msg=name)


def test_bf16_weights_on_the_device_float32_masters_and_moments_on_the_host(checkpoint, batch):
    trainer = _trainer(checkpoint, offload=True, train_dtype="bfloat16")
    # The native model casts its activations to the compute dtype either way: bf16 weights give the logprobs
    # that float32 weights under autocast give, bitwise.
    assert torch.equal(trainer.compute_logprobs(batch),
                       _trainer(checkpoint, offload=False, train_dtype="bfloat16").compute_logprobs(batch))
    host = trainer.host
    assert all(p.dtype == torch.bfloat16 for p in host.params)
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in host.masters)
    before = [m.clone() for m in host.masters]
    metrics = trainer.train_step(batch)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and metrics["train/grad_norm"] > 0
    assert host.gradients == [None] * len(host.params)  # freed after the step
    assert all(p.grad is None for p in host.params)  # the bf16 gradients lived only until added in
    moved = [(m - b).abs().max().item() for m, b in zip(host.masters, before)]
    assert max(moved) == pytest.approx(1e-2, rel=0.05)  # Adam's first step: about lr
    # Some master moves are below bf16's resolution of the weight: kept by the master, lost by a bf16 weight.
    assert any(not torch.equal(m.to(torch.bfloat16).float(), m) for m in host.masters)
    for param, master in zip(host.params, host.masters):
        assert torch.equal(param.detach(), master.to(torch.bfloat16))
    exp_avg = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert exp_avg and all(m.dtype == torch.float32 and m.device.type == "cpu" for m in exp_avg)
    state = trainer.state_dict()["model"]  # the checkpoint keeps the float32 masters, by HF name
    assert all(t.dtype == torch.float32 for t in state.values())
    assert all(t.dtype == torch.bfloat16 for t in trainer.named_weights().values())


@pytest.mark.parametrize("saved_offloaded", [True, False])
def test_checkpoints_resume_with_or_without_offload(checkpoint, batch, tmp_path, saved_offloaded):
    """A checkpoint of either placement resumes in the other: the next step equals the saving trainer's own next
    step (both kernels fused, so exactly)."""
    saver = _trainer(checkpoint, offload=saved_offloaded, fused=not saved_offloaded)
    saver.train_step(batch)
    torch.save(saver.state_dict(), tmp_path / "state.pt")
    resumed = _trainer(checkpoint, offload=not saved_offloaded, fused=saved_offloaded)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    kernels = {(bool(g["foreach"]), g["fused"]) for g in resumed.optimizer.param_groups}
    assert kernels == {(False, True)}  # its own kernel, not the saved one
    assert resumed.train_step(batch) == saver.train_step(batch)
    for name, weight in saver.named_weights().items():
        assert torch.equal(resumed.named_weights()[name], weight), name


def test_a_refused_step_changes_nothing(checkpoint, batch):
    trainer = _trainer(checkpoint, offload=True, max_consecutive_nonfinite_steps=0)
    before = [m.clone() for m in trainer.host.masters]
    with torch.no_grad():
        trainer.host.params[0].fill_(float("nan"))  # a NaN weight: NaN loss and gradients
    trainer.train_step(batch)
    assert trainer.guard.num_skipped == 1 and trainer.num_optimizer_steps == 0
    assert all(torch.equal(m, b) for m, b in zip(trainer.host.masters, before))
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in trainer.optimizer.state.values())
    assert trainer.host.gradients == [None] * len(trainer.host.params)


def test_the_reference_model_computes_as_the_actor_and_updates_from_the_masters(checkpoint, batch):
    """bf16: the reference holds bf16 weights as the actor does, so their logprobs are equal until the actor
    moves (the first step's KL is 0); update_reference copies the masters' cast."""
    trainer = TorchTrainer(checkpoint, TrainConfig(lr=1e-2, seed=0, train_device="cpu", optimizer_cpu_offload=True,
                                                   train_dtype="bfloat16"),
                           AlgorithmConfig(use_kl_loss=True), temperature=1.0)
    reference_logprobs = trainer.compute_logprobs(batch, reference=True)
    assert torch.equal(reference_logprobs, trainer.compute_logprobs(batch))
    trainer.train_step(dataclasses.replace(batch, ref_log_probs=reference_logprobs))
    assert not torch.equal(reference_logprobs, trainer.compute_logprobs(batch))
    trainer.update_reference()
    assert torch.equal(trainer.compute_logprobs(batch, reference=True), trainer.compute_logprobs(batch))
    reference = dict(trainer.ref_model.named_parameters())
    for (name, _), master in zip(trainer.model.named_parameters(), trainer.host.masters):
        assert torch.equal(reference[name], master.to(torch.bfloat16)), name


def test_the_moments_are_allocated_at_start_up_after_a_host_memory_check(checkpoint, monkeypatch):
    trainer = _trainer(checkpoint, offload=True)
    state = trainer.optimizer.state  # zeros at step 0 before any step: the memory is taken now
    assert len(state) == len(trainer.host.masters)
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in state.values())
    numel = sum(m.numel() for m in trainer.host.masters)
    monkeypatch.setattr(host_optimizer, "available_host_memory", lambda: 8 * numel - 1)  # a smaller machine
    with pytest.raises(MemoryError, match=r"AdamW's moments and staging buffers for 0.00B parameters "
                                          r"\(--optimizer-cpu-offload\) need 0.0 GiB of host memory and 0.0 GiB"):
        _trainer(checkpoint, offload=True)
    monkeypatch.setattr(host_optimizer, "available_host_memory", lambda: 8 * numel)
    _trainer(checkpoint, offload=True)


def test_host_memory_reads_meminfo_and_names_the_figures():
    from sluice.trainer.host_memory import available_host_memory, check_host_memory

    assert available_host_memory() > 0  # Linux: /proc/meminfo, lowered to a cgroup limit if any
    check_host_memory(3 * 2**30, "three things", available=3 * 2**30)
    with pytest.raises(MemoryError, match="three things need 3.0 GiB of host memory and 2.0 GiB is available"):
        check_host_memory(3 * 2**30, "three things", available=2 * 2**30)


def test_offload_train_drops_the_device_weights_and_rebuilds_them_from_the_masters(checkpoint, batch, tmp_path):
    """--offload-train with host masters: the device weights are given back, not copied to the host, and come
    back exactly; training goes on as if nothing moved."""
    moved, still = _trainer(checkpoint, offload=True), _trainer(checkpoint, offload=True)
    moved.train_step(batch), still.train_step(batch)
    before = moved.named_weights()
    moved.actor.offload()
    assert all(p.numel() == 0 for p in moved.host.params)
    # A checkpoint or HF export taken while offloaded (the loop saves after an eval) reads the masters.
    offloaded = moved.named_weights()
    assert offloaded.keys() == before.keys() and all(torch.equal(offloaded[n], w) for n, w in before.items())
    moved.save_hf(tmp_path / "hf")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").num_parameters() > 0
    moved.actor.onload()
    for param, master in zip(moved.host.params, moved.host.masters):
        assert torch.equal(param.detach(), master) and param.data_ptr() != master.data_ptr()
    assert moved.train_step(batch) == still.train_step(batch)


def test_chunks_are_consecutive_and_bounded():
    tensors = [torch.empty(n) for n in (3, 4, 10, 2, 2, 1)]
    assert host_optimizer._chunks([0, 1, 2, 3, 4, 5], tensors, 7) == [[0, 1], [2], [3, 4, 5]]
    assert host_optimizer._chunks([1, 3], tensors, 100) == [[1, 3]]
    assert host_optimizer._chunks([], tensors, 7) == []
