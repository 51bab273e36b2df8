"""Supervised warm-start of the demo model: SFT loss on (prompt, answer) pairs through the RL trainer."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.trainer.batching import collate
from sluice.trainer.torch_backend import TorchTrainer
from sluice.types import Sample

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def sft_samples(prompts: list[Sample], tokenizer) -> list[Sample]:
    """Each prompt followed by its label and EOS: the response the model should learn to give."""
    out = []
    for prompt in prompts:
        answer = tokenizer.encode(str(prompt.label), add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append(Sample(prompt=prompt.prompt, prompt_tokens=list(prompt.prompt_tokens),
                          tokens=list(prompt.prompt_tokens) + answer, response_length=len(answer),
                          label=prompt.label))
    return out


def warm_start(checkpoint: str, prompts: list[Sample], tokenizer, out_dir: str | Path, num_steps: int,
               batch_size: int, lr: float, seed: int, device: str = "cpu", micro_batch_size: int | None = None,
               log=print) -> Path:
    """Train ``num_steps`` SFT steps from ``checkpoint`` and save an HF checkpoint (with tokenizer) to out_dir."""
    train = TrainConfig(lr=lr, lr_warmup_iters=max(num_steps // 10, 1), seed=seed,
                        micro_batch_size=micro_batch_size or batch_size,
                        adam_beta2=0.98, train_device=device)
    trainer = TorchTrainer(checkpoint, train, AlgorithmConfig(loss_type="sft_loss"), temperature=1.0)
    examples = sft_samples(prompts, tokenizer)
    rng = random.Random(seed)
    for step in range(num_steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        metrics = trainer.train_step(collate(batch, [0.0] * len(batch), tokenizer.pad_token_id))
        if (step + 1) % max(num_steps // 5, 1) == 0:
            log(f"  sft step {step + 1}/{num_steps}: loss {metrics['train/loss']:.3f}")
    out = Path(out_dir)
    trainer.save_hf(out)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(checkpoint) / name, out / name)
    return out
