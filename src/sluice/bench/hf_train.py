"""The reference of `sluice bench train`: a plain Hugging Face training loop over the same sequences.

What "plain" means here: ``AutoModelForCausalLM`` with sdpa attention at the compute dtype (its weights and
AdamW moments in that dtype too), fused AdamW on CUDA, right-padded micro-batches of a fixed number of rows
sorted by length (little padding), the model's own loss (cross entropy over the response tokens, ``labels``
-100 elsewhere) as a token mean over the whole step (``num_items_in_batch``), gradients accumulated over the
micro-batches, one optimizer step per step. No gradient checkpointing, no gradient clipping, no packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sluice.bench.train_timing import TrainTimes, time_steps
from sluice.types import Sample

IGNORE_INDEX = -100  # transformers' cross entropy skips these labels


@dataclass
class PaddedMicroBatch:
    input_ids: torch.Tensor  # [rows, longest] int64, 0 after each sequence
    attention_mask: torch.Tensor  # [rows, longest] 1 on real tokens
    labels: torch.Tensor  # [rows, longest] the token on response positions, IGNORE_INDEX elsewhere


def padded_micro_batches(samples: list[Sample], rows: int) -> list[PaddedMicroBatch]:
    """Micro-batches of ``rows`` samples of similar length (longest first), right-padded to their longest."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].tokens), reverse=True)
    batches = []
    for start in range(0, len(order), rows):
        picked = [samples[i] for i in order[start : start + rows]]
        width = max(len(s.tokens) for s in picked)
        input_ids = torch.zeros((len(picked), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, sample in enumerate(picked):
            tokens = torch.tensor(sample.tokens, dtype=torch.long)
            input_ids[row, : len(tokens)] = tokens
            attention_mask[row, : len(tokens)] = 1
            labels[row, len(sample.prompt_tokens) : len(tokens)] = tokens[len(sample.prompt_tokens) :]
        batches.append(PaddedMicroBatch(input_ids, attention_mask, labels))
    return batches


def time_hf_training(path: Path, samples: list[Sample], micro_batch_rows: int, num_warmup: int, num_steps: int,
                     device: torch.device, dtype: torch.dtype, lr: float) -> tuple[TrainTimes, int]:
    """Timed steps of the plain loop on ``samples``; also returns the number of micro-batches per step."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    micro_batches = padded_micro_batches(samples, micro_batch_rows)
    # The loss is a sum over each micro-batch divided by this step-wide count: the token mean over the step.
    num_response_tokens = sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in micro_batches)

    def train_step() -> None:
        for mb in micro_batches:  # copied to the device inside the step, as our trainer does
            out = model(input_ids=mb.input_ids.to(device), attention_mask=mb.attention_mask.to(device),
                        labels=mb.labels.to(device), num_items_in_batch=num_response_tokens, use_cache=False)
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(device, num_warmup, num_steps, train_step, optimizer)
    return times, len(micro_batches)
