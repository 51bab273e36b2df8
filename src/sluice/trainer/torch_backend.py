"""The torch trainer backend: an HF causal LM (and, for PPO, its critic) trained with AdamW on one device."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.checkpoint.hf_export import export_hf
from sluice.device import resolve_device
from sluice.trainer.batching import micro_batch_rows
from sluice.trainer.critic import Critic, ValueBatch
from sluice.trainer.custom_loss import CustomLossFn, load_custom_loss
from sluice.trainer.guards import NonFiniteGuard
from sluice.trainer.logprobs import token_logprobs
from sluice.trainer.loss import micro_batch_loss
from sluice.trainer.optimizer import build_optimizer, optimizer_step
from sluice.types import TrainBatch


class TorchTrainer:
    """Implements the trainer contract: compute_logprobs, train_step, named_weights, state_dict; with a critic
    (--advantage-estimator ppo) also compute_values and train_critic_step."""

    def __init__(
        self,
        model_path: str,
        train: TrainConfig,
        algorithm: AlgorithmConfig,
        temperature: float,
        ref_path: str | None = None,
        custom_loss: CustomLossFn | None = None,
    ):
        self.config, self.algorithm, self.temperature = train, algorithm, temperature
        self.device = resolve_device(train.train_device)
        torch.manual_seed(train.seed)
        self.model = self._load(model_path, getattr(torch, train.train_dtype)).train()
        self.ref_model = None
        if algorithm.needs_reference:  # the reference model costs memory: load it only when a KL term needs it
            self.ref_model = self._load(ref_path or model_path, getattr(torch, train.train_dtype)).eval()
            self.ref_model.requires_grad_(False)
        self.critic = Critic(train.critic_load or model_path, train, algorithm, self.device) \
            if algorithm.uses_critic else None
        if algorithm.loss_type == "custom_loss" and custom_loss is None:
            custom_loss = load_custom_loss(algorithm.custom_loss_function_path)
        self.custom_loss = custom_loss
        self.optimizer, self.scheduler = build_optimizer(self.model, train)
        self.num_optimizer_steps = 0
        self.guard = NonFiniteGuard(train.max_consecutive_nonfinite_steps)

    def _load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)

    @torch.no_grad()
    def update_reference(self) -> None:
        """Make the reference model a copy of the current actor (--ref-update-interval)."""
        if self.ref_model is None:
            raise RuntimeError("no reference model is loaded (it exists only with --use-kl-loss or --kl-coef)")
        self.ref_model.load_state_dict(self.model.state_dict())

    @property
    def needs_ref(self) -> bool:
        return self.ref_model is not None

    @property
    def packed(self) -> bool:
        """Micro-batches run as packed rows (--use-dynamic-batch-size)."""
        return self.config.use_dynamic_batch_size

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """Logprobs [B, T-1] of the batch's tokens under the actor (or the reference model), on CPU.

        The micro-batches are those of ``train_step``, so at the first step the two passes agree bitwise.
        """
        model = self.ref_model if reference else self.model
        out = torch.zeros(batch.loss_mask.shape)
        for rows in micro_batch_rows(batch.attention_mask, self.config):
            micro = batch.select(rows)
            log_probs, _ = token_logprobs(model, micro.input_ids.to(self.device), micro.attention_mask.to(self.device),
                                          self.temperature, packed=self.packed)
            out[rows, : log_probs.shape[1]] = log_probs.cpu()
        return out

    def compute_values(self, batch: TrainBatch) -> torch.Tensor:
        """The critic's values [B, T-1] of the batch (CPU)."""
        return self._require_critic().compute_values(batch)

    def train_critic_step(self, batch: ValueBatch, max_len: int | None = None) -> dict[str, float]:
        """One optimizer step of the critic (clipped value loss); see critic.py."""
        return self._require_critic().train_step(batch, max_len)

    def _require_critic(self) -> Critic:
        if self.critic is None:
            raise RuntimeError("no critic is loaded (it exists only with --advantage-estimator ppo)")
        return self.critic

    def train_step(self, batch: TrainBatch, max_len: int | None = None) -> dict[str, float]:
        """One optimizer step over the whole batch, accumulated over micro-batches; returns metrics.

        ``max_len`` (the rollout's max response length) is the constant of --loss-agg-mode
        seq_mean_token_sum_norm. Token and sequence counts are of this whole step, not of a micro-batch.
        """
        self.model.train()
        num_tokens = max(batch.loss_mask.sum().item(), 1.0)
        num_sequences = int((batch.loss_mask.sum(dim=1) > 0).sum().item())
        metric_sums: dict[str, float] = defaultdict(float)
        for rows in micro_batch_rows(batch.attention_mask, self.config):
            micro = _to_device(batch.select(rows), self.device)
            log_probs, entropy = token_logprobs(self.model, micro.input_ids, micro.attention_mask, self.temperature,
                                                with_entropy=True, packed=self.packed)
            loss, metrics = micro_batch_loss(self.algorithm, micro, log_probs, entropy, num_tokens, num_sequences,
                                             max_len, self.custom_loss)
            loss.backward()
            for key, value in metrics.items():
                metric_sums[key] += value
        loss = metric_sums["train/loss"]
        grad_norm, applied = optimizer_step(self.model, self.optimizer, self.scheduler, self.config.clip_grad,
                                            accept=lambda norm: self.guard.accept(loss, norm))
        self.num_optimizer_steps += int(applied)
        return {**metric_sums, "train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0]}

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The actor's weights by HF name (detached views, no copy)."""
        return {name: p.detach() for name, p in self.model.state_dict().items()}

    def state_dict(self, with_optimizer: bool = True) -> dict:
        """Everything a resume needs; ``with_optimizer=False`` (--no-save-optim) leaves out the AdamW moments."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if with_optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "num_optimizer_steps": self.num_optimizer_steps,
            "guard": self.guard.state_dict(),
            # The reference changes only with --ref-update-interval; saved so a resume keeps the same one.
            "ref_model": self.ref_model.state_dict() if self.ref_model is not None else None,
            "critic": self.critic.state_dict(with_optimizer) if self.critic is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; without saved optimizer state the moments restart from zero."""
        self.model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_optimizer_steps = state["num_optimizer_steps"]
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        if self.ref_model is not None and state.get("ref_model") is not None:
            self.ref_model.load_state_dict(state["ref_model"])
        if self.critic is not None:
            if state.get("critic") is None:
                raise ValueError("the checkpoint has no critic (it was not saved by a ppo run), so a ppo run cannot "
                                 "resume from it; start a new ppo run from its hf/ export instead")
            self.critic.load_state_dict(state["critic"])

    def save_hf(self, path: str | Path, tokenizer=None) -> None:
        """The actor as a Hugging Face model directory (with ``tokenizer``'s files when given)."""
        export_hf(self.model, tokenizer, path, atomic=False)


def _to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return TrainBatch(**moved)
