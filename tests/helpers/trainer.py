"""The trainer on a tiny checkpoint (CPU): a factory, random samples of mixed lengths, a PPO batch, one step
with its gradients recorded."""

from __future__ import annotations

import random

import torch

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.trainer.batching import collate
from sluice.trainer.torch_backend import TorchTrainer
from sluice.types import Sample, TrainBatch

PAD = 0
VOCAB = 102  # the demo tokenizer: 3 specials + 96 characters + 3 role names


def make_trainer(path: str, micro: int = 8, lr: float = 1e-3, temperature: float = 0.8,
                 algorithm: AlgorithmConfig | None = None, **train_kwargs) -> TorchTrainer:
    train_kwargs.setdefault("use_dynamic_batch_size", False)  # padded rows of `micro` unless a test packs
    train = TrainConfig(micro_batch_size=micro, lr=lr, train_device="cpu", seed=0, **train_kwargs)
    return TorchTrainer(path, train, algorithm or AlgorithmConfig(eps_clip=0.2, eps_clip_high=0.28), temperature)


def random_samples(num: int, seed: int) -> tuple[list[Sample], list[float]]:
    """``num`` samples of different prompt and response lengths, one with a tool-output hole in its mask."""
    rng = random.Random(seed)
    samples, advantages = [], []
    for i in range(num):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))]
        response = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 8))]
        mask = [1] * len(response)
        if i == 2 and len(response) > 2:
            mask[1] = 0
        samples.append(Sample(prompt="p", prompt_tokens=prompt, tokens=prompt + response, loss_mask=mask,
                              response_length=len(response)))
        advantages.append(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 1.5))
    assert len({len(s.tokens) for s in samples}) >= min(3, num)  # lengths differ, so padding differs per split
    return samples, advantages


def run_step(trainer: TorchTrainer, batch: TrainBatch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One real train_step, also recording each parameter's gradient as the optimizer is about to use it."""
    grads: dict[str, torch.Tensor] = {}

    def record(optimizer, args, kwargs):
        grads.update({name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()})

    handle = trainer.optimizer.register_step_pre_hook(record)
    try:
        metrics = trainer.train_step(batch)
    finally:
        handle.remove()
    return metrics, grads


def ppo_batch(trainer: TorchTrainer) -> TrainBatch:
    samples, advantages = random_samples(8, seed=0)
    batch = collate(samples, advantages, PAD)
    old = trainer.compute_logprobs(batch)
    # Behaviour logprobs a little off the current policy, so ratios differ from 1 and some tokens clip.
    noise = torch.empty_like(old).uniform_(-0.4, 0.4, generator=torch.Generator().manual_seed(0))
    batch.old_log_probs = old + noise * batch.loss_mask
    return batch
