"""The torch trainer backend: an HF causal LM (and, for PPO, its critic) trained with AdamW on one device, or
data-parallel over a train pool of processes (see data_parallel.py)."""

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
from sluice.trainer.data_parallel import DataParallel
from sluice.trainer.guards import NonFiniteGuard
from sluice.trainer.model_logprobs import token_logprobs
from sluice.trainer.loss import micro_batch_loss
from sluice.trainer.optimizer import build_optimizer, optimizer_step
from sluice.types import TrainBatch


class TorchTrainer:
    """Implements the trainer contract: compute_logprobs, train_step, named_weights, state_dict; with a critic
    (--advantage-estimator ppo) also compute_values and train_critic_step.

    Data-parallel: the caller starts N processes, initialises a process group over them (gloo on CPU, nccl on
    GPUs, after ``torch.cuda.set_device(local_rank)``) and passes it as ``process_group`` on every rank, e.g.
    ``TorchTrainer(..., process_group=torch.distributed.group.WORLD)``. Every rank then calls the same methods
    in the same order with the same batches and gets the same results as one process; each runs only its share
    of the micro-batches. ``fsdp`` (default: on CUDA) shards the weights with FSDP2. Collective methods, which
    every rank must call: all but ``needs_ref``/``packed``; ``state_dict`` returns the full state on rank 0
    (with FSDP, the other ranks get empty model and optimizer entries); ``load_state_dict`` takes the same full
    state on every rank; ``save_hf`` writes on rank 0 only.
    """

    def __init__(
        self,
        model_path: str,
        train: TrainConfig,
        algorithm: AlgorithmConfig,
        temperature: float,
        ref_path: str | None = None,
        custom_loss: CustomLossFn | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        fsdp: bool | None = None,
    ):
        self.config, self.algorithm, self.temperature = train, algorithm, temperature
        self.device = resolve_device(train.train_device)
        self.data_parallel = DataParallel.create(process_group, self.device, fsdp)
        torch.manual_seed(train.seed)
        self.model = self._load(model_path, getattr(torch, train.train_dtype)).train()
        self.ref_model = None
        if algorithm.needs_reference:  # the reference model costs memory: load it only when a KL term needs it
            self.ref_model = self._load(ref_path or model_path, getattr(torch, train.train_dtype)).eval()
            self.ref_model.requires_grad_(False)
        self.critic = Critic(train.critic_load or model_path, train, algorithm, self.device, self.data_parallel) \
            if algorithm.uses_critic else None
        if algorithm.loss_type == "custom_loss" and custom_loss is None:
            custom_loss = load_custom_loss(algorithm.custom_loss_function_path)
        self.custom_loss = custom_loss
        self.optimizer, self.scheduler = build_optimizer(self.model, train)
        self.num_optimizer_steps = 0
        self.guard = NonFiniteGuard(train.max_consecutive_nonfinite_steps)

    def _load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        return self.data_parallel.shard(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device))

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
        for rows, is_filler in self.data_parallel.share(micro_batch_rows(batch.attention_mask, self.config)):
            micro = batch.select(rows)
            log_probs, _ = token_logprobs(model, micro.input_ids.to(self.device), micro.attention_mask.to(self.device),
                                          self.temperature, packed=self.packed)
            if not is_filler:
                out[rows, : log_probs.shape[1]] = log_probs.cpu()
        return self.data_parallel.sum_(out)

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
        for rows, is_filler in self.data_parallel.share(micro_batch_rows(batch.attention_mask, self.config)):
            micro = _to_device(batch.select(rows), self.device)
            log_probs, entropy = token_logprobs(self.model, micro.input_ids, micro.attention_mask, self.temperature,
                                                with_entropy=True, packed=self.packed)
            loss, metrics = micro_batch_loss(self.algorithm, micro, log_probs, entropy, num_tokens, num_sequences,
                                             max_len, self.custom_loss)
            if is_filler:  # joins FSDP's gradient collectives with a zero gradient
                (loss * 0.0).backward()
                continue
            loss.backward()
            for key, value in metrics.items():
                metric_sums[key] += value
        # Summed over the ranks before the grad norm and the guard, so every rank takes (or skips) the same step.
        self.data_parallel.reduce_gradients(self.model)
        metric_sums = self.data_parallel.reduce_metric_sums(metric_sums)
        loss = metric_sums["train/loss"]
        grad_norm, applied = optimizer_step(self.model, self.optimizer, self.scheduler, self.config.clip_grad,
                                            accept=lambda norm: self.guard.accept(loss, norm))
        self.num_optimizer_steps += int(applied)
        return {**metric_sums, "train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0]}

    def offload(self) -> None:
        """Move the models and optimizer state to host memory (--offload-train: the engines generate meanwhile)."""
        self._move(torch.device("cpu"))

    def onload(self) -> None:
        """Back to the training device after ``offload``."""
        self._move(self.device)

    def _move(self, device: torch.device) -> None:
        if self.device.type == "cpu":
            return
        pairs = [(self.model, self.optimizer)]
        if self.ref_model is not None:
            pairs.append((self.ref_model, None))
        if self.critic is not None:
            pairs.append((self.critic.model, self.critic.optimizer))
        for model, optimizer in pairs:
            model.to(device)
            for state in (optimizer.state.values() if optimizer is not None else ()):
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        state[key] = value.to(device, non_blocking=True)
        if device.type == "cpu":
            torch.cuda.empty_cache()

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The actor's full weights by HF name, on every rank (detached views, no copy, unless FSDP gathers them)."""
        return self.data_parallel.full_weights(self.model)

    def state_dict(self, with_optimizer: bool = True) -> dict:
        """Everything a resume needs; ``with_optimizer=False`` (--no-save-optim) leaves out the AdamW moments.

        Data-parallel: every rank calls it and rank 0 saves it (with FSDP only rank 0's model and optimizer
        entries are filled; the optimizer's are keyed by parameter name, so such a checkpoint resumes with FSDP).
        """
        dp = self.data_parallel
        return {
            "model": dp.model_state(self.model),
            "optimizer": dp.optimizer_state(self.model, self.optimizer) if with_optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "num_optimizer_steps": self.num_optimizer_steps,
            "guard": self.guard.state_dict(),
            # The reference changes only with --ref-update-interval; saved so a resume keeps the same one.
            "ref_model": dp.model_state(self.ref_model) if self.ref_model is not None else None,
            "critic": self.critic.state_dict(with_optimizer) if self.critic is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; without saved optimizer state the moments restart from zero.

        Data-parallel: every rank calls it with the same (rank 0's) state, e.g. each reads the checkpoint file.
        """
        dp = self.data_parallel
        dp.load_model_state(self.model, state["model"])
        if state.get("optimizer") is not None:
            dp.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_optimizer_steps = state["num_optimizer_steps"]
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        if self.ref_model is not None and state.get("ref_model") is not None:
            dp.load_model_state(self.ref_model, state["ref_model"])
        if self.critic is not None:
            if state.get("critic") is None:
                raise ValueError("the checkpoint has no critic (it was not saved by a ppo run), so a ppo run cannot "
                                 "resume from it; start a new ppo run from its hf/ export instead")
            self.critic.load_state_dict(state["critic"])

    def save_hf(self, path: str | Path, tokenizer=None) -> None:
        """The actor as a Hugging Face model directory (with ``tokenizer``'s files when given).

        Data-parallel: every rank calls it (FSDP gathers the weights); rank 0 writes.
        """
        dp = self.data_parallel
        weights = dp.model_state(self.model) if dp.fsdp else None  # a collective: before the rank test
        if dp.rank != 0:
            return
        if weights is None:
            export_hf(self.model, tokenizer, path, atomic=False)
            return
        self.model.save_pretrained(path, state_dict=weights, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def _to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return TrainBatch(**moved)
