"""The PPO critic: a value model on the actor's backbone class, trained by clipped value regression.

The critic is the Hugging Face ``*ForTokenClassification`` model of the checkpoint's architecture with one label:
the same backbone as the actor (e.g. ``Qwen2Model``) and a linear scalar head (``score``). Loaded from a causal
LM checkpoint, the backbone weights come from it and the head is new; the head then starts at exactly 0 (weight
and bias), so the first values are 0 and the first advantages are the plain returns, whatever the seed. A
saved critic (``save_pretrained`` of this model) loads with its head. The classifier dropout is set to 0: a
value model must be deterministic, or the clip anchor (the rollout-time value) would not match the training
forward at the first step.

The value of target position t (aligned with ``input_ids[:, 1:]``, like logprobs) is the head's output at
position t: the state before the token at t + 1 is chosen.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

from sluice.algorithms import aggregate, clipped_value_loss
from sluice.config import AlgorithmConfig, TrainConfig
from sluice.device import tensor_to_device
from sluice.trainer.batching import fill_rows, micro_batch_rows
from sluice.trainer.loss import metric_floats
from sluice.trainer.data_parallel import DataParallel
from sluice.trainer.optimized_model import OptimizedModel
from sluice.trainer.packing import pack_rows


@dataclass
class ValueBatch:
    """What one critic step trains on; rows and target positions as in ``TrainBatch``."""

    input_ids: Tensor  # [B, T] int64, right-padded
    attention_mask: Tensor  # [B, T] 1 for real tokens
    loss_mask: Tensor  # [B, T-1] 1 where the target token is a trained response token
    old_values: Tensor  # [B, T-1] the critic's values when the rollout was scored: the clip anchor
    returns: Tensor  # [B, T-1] GAE returns (advantages + old values): the regression target

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | Tensor) -> "ValueBatch":
        """A sub-batch with padding columns past its longest row cut (as ``TrainBatch.select``)."""
        attention_mask = self.attention_mask[rows]
        width = max(int(attention_mask.sum(dim=1).max().item()) if attention_mask.numel() else 1, 2)
        return ValueBatch(self.input_ids[rows, :width], attention_mask[:, :width], self.loss_mask[rows, : width - 1],
                          self.old_values[rows, : width - 1], self.returns[rows, : width - 1])

    def to(self, device: torch.device) -> "ValueBatch":
        """On ``device``; from pinned host memory on a GPU, so the copies do not wait for the queued work."""
        return ValueBatch(*(tensor_to_device(getattr(self, name), device) for name in self.__dataclass_fields__))


def load_value_model(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """The token-classification model (1 label, no dropout) of the checkpoint at ``path``; a new head is zeroed."""
    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.classifier_dropout = 0.0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised score head" report is expected here, not news
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if any(key.startswith("score.") for key in info["missing_keys"]):
        with torch.no_grad():
            for param in model.score.parameters():
                param.zero_()
    return model


def token_values(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, packed: bool = False) -> Tensor:
    """Values ``[B, T-1]`` in float32 at each target position (0 past each row's end when ``packed``)."""
    if packed:
        packing = pack_rows(input_ids, attention_mask)
        out = model(input_ids=packing.input_ids, position_ids=packing.position_ids, attention_mask=None,
                    use_cache=False).logits[0, :-1, 0]
        return packing.unpack(out.float())
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1, 0].float()


class Critic:
    """Value model + its own AdamW (``--critic-lr``, default ``--lr``; warmup and clipping as the actor), with the
    actor's precision: float32 master weights and moments, compute in --train-dtype under autocast, or host
    masters with --optimizer-cpu-offload (optimized_model.py).

    ``data_parallel``: the actor's train pool (see data_parallel.py); every rank calls every method.
    """

    def __init__(self, path: str, train: TrainConfig, algorithm: AlgorithmConfig, device: torch.device,
                 data_parallel: DataParallel | None = None):
        self.config, self.algorithm, self.device = train, algorithm, device
        self.data_parallel = data_parallel or DataParallel()
        self.compute_dtype = getattr(torch, train.train_dtype)
        self.optimized = OptimizedModel(lambda on: load_value_model(path, torch.float32).to(on), train, device,
                                        self.compute_dtype, self.data_parallel, lr=train.critic_lr)
        self.model.train()

    @property
    def model(self) -> torch.nn.Module:
        return self.optimized.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimized.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self.optimized.scheduler

    def _values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``token_values`` of a micro-batch, on the device, computing in the compute dtype."""
        input_ids, attention_mask = tensor_to_device(input_ids, self.device), tensor_to_device(attention_mask, self.device)
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            return token_values(self.model, input_ids, attention_mask, self.config.use_dynamic_batch_size)

    @torch.no_grad()
    def compute_values(self, batch) -> Tensor:
        """Values ``[B, T-1]`` (CPU) of a ``TrainBatch`` or ``ValueBatch``, in the training layout."""
        pieces = []
        for rows, is_filler in self.data_parallel.share(micro_batch_rows(batch.attention_mask, self.config)):
            micro = batch.select(rows)
            values = self._values(micro.input_ids, micro.attention_mask)
            if not is_filler:
                pieces.append((rows, values))
        out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
        return self.data_parallel.sum_(fill_rows(out, pieces))

    def train_step(self, batch: ValueBatch, max_len: int | None = None) -> dict[str, float]:
        """One optimizer step of clipped value regression over ``batch``, reduced like the policy loss
        (--loss-agg-mode with the step's counts), so micro-batching does not change it."""
        self.model.train()
        num_tokens = max(batch.loss_mask.sum().item(), 1.0)
        num_sequences = int((batch.loss_mask.sum(dim=1) > 0).sum().item())
        mode = self.algorithm.loss_agg_mode
        sums: dict[str, Tensor | float] = defaultdict(float)  # device tensors, read once after the loop
        for rows, is_filler in self.data_parallel.share(micro_batch_rows(batch.attention_mask, self.config)):
            micro = batch.select(rows).to(self.device)
            values = self._values(micro.input_ids, micro.attention_mask)
            per_token, stats = clipped_value_loss(values, micro.old_values, micro.returns, self.algorithm.value_clip)
            loss = aggregate(per_token, micro.loss_mask, mode, num_tokens=num_tokens, num_sequences=num_sequences,
                             max_len=max_len)
            if is_filler:  # joins FSDP's gradient collectives with a zero gradient
                (loss * 0.0).backward()
                continue
            loss.backward()
            counts = dict(num_tokens=num_tokens, num_sequences=num_sequences)
            sums["train/value_loss"] += loss.detach()
            sums["train/value_clipfrac"] += aggregate(stats["clipfrac"], micro.loss_mask, "token_mean", **counts)
            sums["train/value_mean"] += aggregate(values.detach(), micro.loss_mask, "token_mean", **counts)
        self.optimized.reduce_gradients()
        sums = self.data_parallel.reduce_metric_sums(metric_floats(sums))
        loss = sums["train/value_loss"]
        # A non-finite value loss or gradient skips the critic's step (the actor's guard decides when to stop).
        grad_norm, applied = self.optimized.step(self.config.clip_grad,
                                                 accept=lambda norm: math.isfinite(loss) and math.isfinite(norm))
        return {**sums, "train/critic_grad_norm": grad_norm, "train/critic_lr": self.optimized.lr,
                "train/critic_nonfinite_skipped_frac": float(not applied)}

    def state_dict(self, with_optimizer: bool = True) -> dict:
        return {"model": self.optimized.model_state(),
                "optimizer": self.optimized.optimizer_state() if with_optimizer else None,
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimized.load_model_state(state["model"])
        if state.get("optimizer") is not None:
            self.optimized.load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
