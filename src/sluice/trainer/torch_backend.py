"""The torch trainer backend: an HF causal LM trained with AdamW on one device (CPU or one GPU)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.device import resolve_device
from sluice.trainer.batching import split, split_by_length
from sluice.trainer.logprobs import token_logprobs
from sluice.trainer.loss import micro_batch_loss
from sluice.trainer.optimizer import build_optimizer
from sluice.types import TrainBatch


class TorchTrainer:
    """Implements the trainer contract: compute_logprobs, train_step, named_weights, state_dict."""

    def __init__(
        self,
        model_path: str,
        train: TrainConfig,
        algorithm: AlgorithmConfig,
        temperature: float,
        ref_path: str | None = None,
    ):
        self.config, self.algorithm, self.temperature = train, algorithm, temperature
        self.device = resolve_device(train.train_device)
        torch.manual_seed(train.seed)
        self.model = self._load(model_path, getattr(torch, train.train_dtype)).train()
        self.ref_model = None
        if algorithm.use_kl_loss:  # the reference model costs memory: load it only when a KL term needs it
            self.ref_model = self._load(ref_path or model_path, getattr(torch, train.train_dtype)).eval()
            self.ref_model.requires_grad_(False)
        self.optimizer, self.scheduler = build_optimizer(self.model, train)
        self.num_optimizer_steps = 0

    def _load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)

    @torch.no_grad()
    def update_reference(self) -> None:
        """Make the reference model a copy of the current actor (--ref-update-interval)."""
        if self.ref_model is None:
            raise RuntimeError("no reference model is loaded (it exists only with --use-kl-loss)")
        self.ref_model.load_state_dict(self.model.state_dict())

    @property
    def needs_ref(self) -> bool:
        return self.ref_model is not None

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """Logprobs [B, T-1] of the batch's tokens under the actor (or the reference model), on CPU."""
        model = self.ref_model if reference else self.model
        pieces = []
        for micro in split(batch, self.config.micro_batch_size):
            log_probs, _ = token_logprobs(
                model, micro.input_ids.to(self.device), micro.attention_mask.to(self.device), self.temperature
            )
            pieces.append(torch.nn.functional.pad(log_probs.cpu(), (0, batch.input_ids.shape[1] - 1 - log_probs.shape[1])))
        return torch.cat(pieces)

    def train_step(self, batch: TrainBatch, max_len: int | None = None) -> dict[str, float]:
        """One optimizer step over the whole batch, accumulated over micro-batches; returns metrics.

        ``max_len`` (the rollout's max response length) is the constant of --loss-agg-mode
        seq_mean_token_sum_norm. Token and sequence counts are of this whole step, not of a micro-batch.
        """
        self.model.train()
        num_tokens = max(batch.loss_mask.sum().item(), 1.0)
        num_sequences = int((batch.loss_mask.sum(dim=1) > 0).sum().item())
        metric_sums: dict[str, float] = defaultdict(float)
        for micro in split_by_length(batch, self.config.micro_batch_size):
            micro = _to_device(micro, self.device)
            log_probs, entropy = token_logprobs(
                self.model, micro.input_ids, micro.attention_mask, self.temperature, with_entropy=True
            )
            loss, metrics = micro_batch_loss(
                self.algorithm, micro, log_probs, entropy, num_tokens, num_sequences, max_len
            )
            loss.backward()
            for key, value in metrics.items():
                metric_sums[key] += value
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_optimizer_steps += 1
        return {**metric_sums, "train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0]}

    def _clip_gradients(self) -> float:
        max_norm = self.config.clip_grad if self.config.clip_grad > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The actor's weights by HF name (detached views, no copy)."""
        return {name: p.detach() for name, p in self.model.state_dict().items()}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "num_optimizer_steps": self.num_optimizer_steps,
            # The reference changes only with --ref-update-interval; saved so a resume keeps the same one.
            "ref_model": self.ref_model.state_dict() if self.ref_model is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_optimizer_steps = state["num_optimizer_steps"]
        if self.ref_model is not None and state.get("ref_model") is not None:
            self.ref_model.load_state_dict(state["ref_model"])

    def save_hf(self, path: str | Path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)


def _to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return TrainBatch(**moved)
