"""The torch trainer backend: the actor (sluice's native decoder, or the HF class for other families; for PPO
also its critic) trained with AdamW on one device, or data-parallel over a train pool of processes (see
data_parallel.py).

Precision: the actor's parameters, gradients and AdamW moments are float32 (master weights); with
--train-dtype bfloat16 the forward and backward run under ``torch.autocast`` in bf16. Weights leave the trainer
(``named_weights``, HF exports) in the compute dtype, and checkpoints keep the float32 masters. With
--optimizer-cpu-offload the masters and moments stay in host memory and AdamW steps there; the device holds the
weights in the compute dtype and float32 gradients (host_optimizer.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import dataclasses

import torch
from transformers import AutoModelForCausalLM

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.checkpoint.hf_export import write_hf_weights
from sluice.device import resolve_device, tensor_to_device
from sluice.trainer.batching import fill_rows, micro_batch_rows
from sluice.trainer.critic import Critic, ValueBatch
from sluice.trainer.custom_loss import CustomLossFn, load_custom_loss
from sluice.trainer.data_parallel import DataParallel
from sluice.trainer.guards import NonFiniteGuard
from sluice.trainer.host_optimizer import HostMasters
from sluice.trainer.optimized_model import OptimizedModel
from sluice.trainer.model_logprobs import token_logprobs
from sluice.trainer.native_model import (NativeForward, hf_state, load_native, native_state, recompute_plan,
                                         resolve_model_impl)
from sluice.trainer.token_budget import DecoderShape, derived_token_budget
from sluice.trainer.loss import metric_floats, micro_batch_loss
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
        self.algorithm, self.temperature = algorithm, temperature
        self.device = resolve_device(train.train_device)
        self.data_parallel = DataParallel.create(process_group, self.device, fsdp)
        self.compute_dtype = getattr(torch, train.train_dtype)
        self.impl = resolve_model_impl(train.train_model_impl, model_path)
        self.native = None if self.impl == "hf" else NativeForward(
            self.device, self.compute_dtype, train.log_probs_chunk_size,
            recompute_plan(train.recompute_granularity, train.recompute_method, train.recompute_num_layers))
        torch.manual_seed(train.seed)
        self.actor = OptimizedModel(lambda device: self._load_float32(model_path, device), train, self.device,
                                    self.compute_dtype, self.data_parallel)
        self.model.train()
        self.ref_model = None
        if algorithm.needs_reference:  # the reference model costs memory: load it only when a KL term needs it
            self.ref_model = self._load_reference(ref_path or model_path).eval()
            self.ref_model.requires_grad_(False)
        self.critic = Critic(train.critic_load or model_path, train, algorithm, self.device,
                             self.data_parallel) if algorithm.uses_critic else None
        # The derived budget is measured with every model loaded, and the critic splits its batches by it too.
        self.config = dataclasses.replace(train, max_tokens_per_gpu=self._token_budget(train))
        if self.critic is not None:
            self.critic.config = self.config
        if algorithm.loss_type == "custom_loss" and custom_loss is None:
            custom_loss = load_custom_loss(algorithm.custom_loss_function_path)
        self.custom_loss = custom_loss
        self.num_optimizer_steps = 0
        self.guard = NonFiniteGuard(train.max_consecutive_nonfinite_steps)

    @property
    def model(self) -> torch.nn.Module:
        return self.actor.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.actor.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self.actor.scheduler

    @property
    def host(self) -> HostMasters | None:
        """The actor's host masters with --optimizer-cpu-offload."""
        return self.actor.host

    def _load(self, path: str) -> torch.nn.Module:
        """Float32 weights on the training device (sharded with FSDP2 in a data-parallel pool)."""
        return self.data_parallel.shard(self._load_float32(path, self.device), self.compute_dtype)

    def _load_reference(self, path: str) -> torch.nn.Module:
        """The reference model as ``_load``; beside host masters in the compute dtype, cast on the host: it then
        weighs like the actor and computes like it (KL 0 where they are equal)."""
        if self.host is None:
            return self._load(path)
        model = self._load_float32(path, torch.device("cpu"))
        for parameter in model.parameters():
            parameter.data = parameter.data.to(self.compute_dtype)
        return model.to(self.device)

    def _load_float32(self, path: str, load_device: torch.device) -> torch.nn.Module:
        """The checkpoint's model in float32 on ``load_device`` (its ops chosen for the training device)."""
        if self.native is not None:
            return load_native(path, self.device, load_device)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(load_device)

    def _token_budget(self, train: TrainConfig) -> int | None:
        """--max-tokens-per-gpu, or its default (token_budget.py) when micro-batches are packed."""
        if train.max_tokens_per_gpu is not None or not train.use_dynamic_batch_size:
            return train.max_tokens_per_gpu
        config = self.model.config
        plan = self.native.recompute if self.native is not None else None  # the HF class never recomputes
        segments = plan.segments(config.num_hidden_layers) if plan else None
        element_bytes = torch.finfo(self.compute_dtype).bits // 8
        pending = sum(model.step_bytes_per_param * model.num_params for model in self._optimized_models())
        return derived_token_budget(self.device, DecoderShape.of(config), pending, element_bytes, segments)

    def _token_logprobs(self, model, input_ids, attention_mask, with_entropy: bool = False):
        """Logprobs (and entropy) ``[B, T-1]`` on the device of right-padded rows (on the host or the device)."""
        if self.native is not None:  # packs on the host, then queues the device work without waiting for it
            return self.native.token_logprobs(model, input_ids, attention_mask, self.temperature, with_entropy)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            return token_logprobs(model, input_ids, attention_mask, self.temperature, with_entropy=with_entropy,
                                  packed=self.packed)

    @torch.no_grad()
    def update_reference(self) -> None:
        """Make the reference model a copy of the current actor (--ref-update-interval)."""
        if self.ref_model is None:
            raise RuntimeError("no reference model is loaded (it exists only with --use-kl-loss or --kl-coef)")
        self.ref_model.load_state_dict(self.host.model_state(self.model) if self.host is not None
                                       else self.model.state_dict())

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
        pieces = []
        for rows, is_filler in self.data_parallel.share(micro_batch_rows(batch.attention_mask, self.config)):
            micro = batch.select(rows)
            log_probs, _ = self._token_logprobs(model, micro.input_ids, micro.attention_mask)
            if not is_filler:
                pieces.append((rows, log_probs))
        return self.data_parallel.sum_(fill_rows(torch.zeros(batch.loss_mask.shape), pieces))

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
        metric_sums: dict[str, torch.Tensor | float] = defaultdict(float)
        for rows, is_filler in self.data_parallel.share(micro_batch_rows(batch.attention_mask, self.config)):
            host = batch.select(rows)
            micro = _to_device(host, self.device)
            rows_in = host if self.native is not None else micro  # the native forward packs on the host
            log_probs, entropy = self._token_logprobs(self.model, rows_in.input_ids, rows_in.attention_mask,
                                                      with_entropy=True)
            loss, metrics = micro_batch_loss(self.algorithm, micro, log_probs, entropy, num_tokens, num_sequences,
                                             max_len, self.custom_loss)
            if is_filler:  # joins FSDP's gradient collectives with a zero gradient
                (loss * 0.0).backward()
                continue
            loss.backward()
            for key, value in metrics.items():
                metric_sums[key] += value
        # Summed over the ranks before the grad norm and the guard, so every rank takes (or skips) the same step.
        self.actor.reduce_gradients()
        metric_sums = self.data_parallel.reduce_metric_sums(metric_floats(metric_sums))
        loss = metric_sums["train/loss"]
        grad_norm, applied = self.actor.step(self.config.clip_grad, accept=lambda norm: self.guard.accept(loss, norm))
        self.num_optimizer_steps += int(applied)
        return {**metric_sums, "train/grad_norm": grad_norm, "train/lr": self.actor.lr}

    def offload(self) -> None:
        """Move the models and optimizer state to host memory (--offload-train: the engines generate meanwhile)."""
        if self.device.type == "cpu":
            return
        for model in self._optimized_models():
            model.offload()
        if self.ref_model is not None:
            self.ref_model.to("cpu")
        torch.cuda.empty_cache()

    def onload(self) -> None:
        """Back to the training device after ``offload``."""
        if self.device.type == "cpu":
            return
        for model in self._optimized_models():
            model.onload()
        if self.ref_model is not None:
            self.ref_model.to(self.device)

    def _optimized_models(self) -> list[OptimizedModel]:
        return [self.actor] + ([self.critic.optimized] if self.critic is not None else [])

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The actor's full weights by HF name in the compute dtype, on every rank (detached; views of the device
        weights when they are in the compute dtype (float32, or offloaded masters), else bf16 copies of the float32
        masters; FSDP gathers them: a collective)."""
        weights = self._hf_names(self.actor.full_weights(), with_tied_head=True)
        cast: dict[tuple, torch.Tensor] = {}  # a tied head and embedding share storage: cast it once
        for name, tensor in weights.items():
            key = (tensor.data_ptr(), tensor.shape, tensor.stride())
            if key not in cast:
                cast[key] = tensor.to(self.compute_dtype)
            weights[name] = cast[key]
        return weights

    def _hf_names(self, state: dict[str, torch.Tensor], with_tied_head: bool = False) -> dict[str, torch.Tensor]:
        return hf_state(self.model, state, with_tied_head) if self.native is not None and state else state

    def _native_names(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return native_state(self.model, state) if self.native is not None else state

    def state_dict(self, with_optimizer: bool = True) -> dict:
        """Everything a resume needs; ``with_optimizer=False`` (--no-save-optim) leaves out the AdamW moments.

        Data-parallel: every rank calls it and rank 0 saves it (with FSDP only rank 0's model and optimizer
        entries are filled; the optimizer's are keyed by parameter name, so such a checkpoint resumes with FSDP).
        """
        dp = self.data_parallel
        return {
            "model": self._hf_names(self.actor.model_state(), with_tied_head=True),  # HF names, whichever model code trains
            "model_impl": self.impl,  # the optimizer state is keyed by this code's parameters
            "optimizer": self.actor.optimizer_state() if with_optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "num_optimizer_steps": self.num_optimizer_steps,
            "guard": self.guard.state_dict(),
            # The reference changes only with --ref-update-interval; saved so a resume keeps the same one.
            "ref_model": self._hf_names(dp.model_state(self.ref_model), with_tied_head=True) if self.ref_model is not None else None,
            "critic": self.critic.state_dict(with_optimizer) if self.critic is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; without saved optimizer state the moments restart from zero.

        Data-parallel: every rank calls it with the same (rank 0's) state, e.g. each reads the checkpoint file.
        """
        dp = self.data_parallel
        self.actor.load_model_state(self._native_names(state["model"]))
        saved_impl = state.get("model_impl", "hf")
        if state.get("optimizer") is not None and saved_impl != self.impl:
            raise ValueError(f"the checkpoint's optimizer state belongs to the {saved_impl} model code, this run "
                             f"trains with {self.impl}: resume with --train-model-impl {saved_impl}, or start from "
                             "its hf/ export")
        if state.get("optimizer") is not None:
            self.actor.load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_optimizer_steps = state["num_optimizer_steps"]
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        if self.ref_model is not None and state.get("ref_model") is not None:
            dp.load_model_state(self.ref_model, self._native_names(state["ref_model"]))
        if self.critic is not None:
            if state.get("critic") is None:
                raise ValueError("the checkpoint has no critic (it was not saved by a ppo run), so a ppo run cannot "
                                 "resume from it; start a new ppo run from its hf/ export instead")
            self.critic.load_state_dict(state["critic"])

    def save_hf(self, path: str | Path, tokenizer=None) -> None:
        """The actor as a Hugging Face model directory (with ``tokenizer``'s files when given).

        Data-parallel: every rank calls it (FSDP gathers the weights); rank 0 writes.
        """
        weights = self.named_weights()  # a collective with FSDP: before the rank test
        if self.data_parallel.rank != 0:
            return
        if self.native is not None:
            if self.model.tie_word_embeddings:
                weights.pop("lm_head.weight", None)  # HF's checkpoints of tied models leave it out
            write_hf_weights(self.model.config, weights, path)
        else:
            self.model.save_pretrained(path, state_dict=weights, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def _to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    """The batch's tensors on ``device``; from pinned host memory on a GPU, so the copies do not wait for it."""
    return TrainBatch(**{k: (tensor_to_device(v, device) if isinstance(v, torch.Tensor) else v)
                         for k, v in vars(batch).items()})
