"""The native trainer on CUDA (marker ``gpu``): compiled ops, the varlen attention kernel and the chunked LM head in
bf16 agree with float32, train, checkpoint activations, and match the engine's logprobs on the same weights."""

from __future__ import annotations

import pytest
import torch

from sluice.config import AlgorithmConfig, EngineConfig, TrainConfig
from sluice.trainer.torch_backend import TorchTrainer
from sluice.types import TrainBatch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def _batch(vocab: int) -> TrainBatch:
    generator = torch.Generator().manual_seed(0)
    lengths = [40, 17, 64, 33]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros(len(lengths), width - 1)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, vocab, (length,), generator=generator)
        mask[row, :length] = 1
        loss_mask[row, 8 : length - 1] = 1.0
    advantages = torch.randn(len(lengths), 1, generator=generator).expand_as(loss_mask) * loss_mask
    return TrainBatch(input_ids, mask, loss_mask, advantages.contiguous(), torch.zeros_like(loss_mask))


def _trainer(checkpoint: str, **train) -> TorchTrainer:
    return TorchTrainer(checkpoint, TrainConfig(train_device="cuda", seed=0, lr=1e-3, **train), AlgorithmConfig(),
                        temperature=1.0)


def test_bf16_native_trainer_matches_float32_and_trains(lively_checkpoint):
    fp32 = _trainer(lively_checkpoint)
    bf16 = _trainer(lively_checkpoint, train_dtype="bfloat16")
    assert bf16.impl == "native"
    batch = _batch(fp32.model.config.vocab_size)
    reference, fast = fp32.compute_logprobs(batch), bf16.compute_logprobs(batch)
    real = batch.attention_mask[:, 1:].bool()
    gap = (reference - fast)[real].abs()
    assert gap.max() < 0.1 and gap.mean() < 0.02, (gap.max().item(), gap.mean().item())
    first = bf16.train_step(batch)
    assert torch.isfinite(torch.tensor(first["train/loss"])) and first["train/grad_norm"] > 0
    recompute = _trainer(lively_checkpoint, train_dtype="bfloat16", recompute_granularity="full")
    assert recompute.train_step(batch)["train/loss"] == pytest.approx(first["train/loss"], rel=2e-2, abs=1e-3)


def test_engine_and_trainer_logprobs_agree_on_the_same_bf16_weights(lively_checkpoint):
    from helpers.engine_calls import generate
    from sluice.engine.clients.protocol import GenerateRequest
    from sluice.engine.local_engine import LocalEngine
    from sluice.types import SamplingParams

    trainer = _trainer(lively_checkpoint, train_dtype="bfloat16")
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cuda", dtype="bfloat16", max_total_tokens=4096))
    try:
        prompt = list(range(5, 25))
        result = generate(engine, [GenerateRequest(prompt, SamplingParams(temperature=1.0, max_new_tokens=24,
                                                                          ignore_eos=True))])[0]
    finally:
        engine.shutdown()
    tokens = prompt + list(result.output_ids)
    batch = TrainBatch(torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.long),
                       torch.ones(1, len(tokens) - 1), torch.zeros(1, len(tokens) - 1), torch.zeros(1, len(tokens) - 1))
    trained = trainer.compute_logprobs(batch)[0, len(prompt) - 1:]
    engine_logprobs = torch.tensor(result.output_logprobs)
    gap = (trained - engine_logprobs).abs()
    print(f"engine vs trainer bf16 logprob gap: max {gap.max():.4f}, mean {gap.mean():.5f}")
    assert gap.mean() < 0.02 and gap.max() < 0.15


def test_offloaded_optimizer_on_cuda_steps_through_pinned_chunks(lively_checkpoint, monkeypatch):
    """--optimizer-cpu-offload on CUDA: bf16 weights on the GPU, float32 masters and moments on the host. Stepping
    in many chunks (double-buffered copies on the side stream) gives bitwise the steps of one chunk; after each
    step the GPU weights are exactly the masters' bf16 cast; and it trains like the on-device optimizer."""
    from sluice.trainer import host_optimizer

    batch = _batch(_trainer(lively_checkpoint).model.config.vocab_size)
    one_chunk = _trainer(lively_checkpoint, train_dtype="bfloat16", optimizer_cpu_offload=True)
    gap = (one_chunk.compute_logprobs(batch) - _trainer(lively_checkpoint, train_dtype="bfloat16")
           .compute_logprobs(batch)).abs().max().item()
    print(f"offloaded vs float32-weight bf16 logprobs on CUDA: max gap {gap:.6f}")
    assert gap < 0.05  # the compiled norms may skip the weights' bf16 rounding without offload
    expected = [one_chunk.train_step(batch) for _ in range(3)]
    monkeypatch.setattr(host_optimizer, "CHUNK_NUMEL", 3000)
    # The side streams' copies start late: a missing wait on them would read or train on stale values.
    for name, stream in (("fetch", "d2h"), ("send", "h2d")):
        original = getattr(host_optimizer._Staging, name)

        def delayed(self, *args, original=original, stream=stream):
            with torch.cuda.stream(getattr(self, stream)):
                torch.cuda._sleep(5_000_000)
            return original(self, *args)

        monkeypatch.setattr(host_optimizer._Staging, name, delayed)
    chunked = _trainer(lively_checkpoint, train_dtype="bfloat16", optimizer_cpu_offload=True)
    host = chunked.host
    assert len(host_optimizer._chunks(list(range(len(host.masters))), host.masters, 3000)) > 3
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in host.params)
    assert all(m.device.type == "cpu" and m.dtype == torch.float32 for m in host.masters)
    assert [chunked.train_step(batch) for _ in range(3)] == expected
    for param, master in zip(host.params, host.masters):
        assert torch.equal(param.detach().cpu(), master.to(torch.bfloat16))
    assert all(s["exp_avg"].device.type == "cpu" for s in chunked.optimizer.state.values())
    chunked.offload()  # --offload-train: the GPU weights are dropped and rebuilt from the masters
    assert all(p.numel() == 0 for p in host.params)
    chunked.onload()
    for param, master in zip(host.params, host.masters):
        assert torch.equal(param.detach().cpu(), master.to(torch.bfloat16))
    on_device = _trainer(lively_checkpoint, train_dtype="bfloat16")
    reference = [on_device.train_step(batch) for _ in range(3)]
    for got, want in zip(expected, reference):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=2e-2, abs=1e-3)
        assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=5e-2)
