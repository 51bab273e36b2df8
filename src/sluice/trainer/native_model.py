"""The trainer's native model: the engine's decoder (``sluice.models``) with trainable float32 master weights.

``--train-model-impl`` picks it (``auto``: wherever ``sluice.models.ARCHITECTURES`` has the checkpoint's family;
the Hugging Face class otherwise). What the trainer gains over the HF class: packed micro-batches attend
through variable-length attention (``PackedCausalAttention``: no padding, no ``[T, T]`` mask), the LM head runs
in chunks (``lm_head.py``: no ``[T, vocab]`` float32 logits), the elementwise ops are compiled kernels on GPU,
activation checkpointing follows Megatron's flags, and engine and trainer compute with the same code, so their
logprobs differ only by batching. Weights enter and leave under HF names (``models/hf_layout.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from sluice.device import tensor_to_device
from sluice.models import ARCHITECTURES, load_model
from sluice.models.decoder import DecoderLM, RecomputePlan
from sluice.models.fused import compile_op, decoder_ops
from sluice.models.fused import rotary as eager_rotary
from sluice.models.hf_layout import from_hf, split_sizes, to_hf
from sluice.models.packed_attention import PackedCausalAttention, cu_seqlens_from_lengths
from sluice.trainer.lm_head import token_logprobs_from_hidden
from sluice.trainer.packing import pack_rows


def resolve_model_impl(requested: str, model_path: str) -> str:
    """``native`` or ``hf`` for --train-model-impl ``requested`` and the checkpoint's architecture."""
    if requested == "hf":
        return "hf"
    architecture = (_architectures(model_path) or ["?"])[0]
    if architecture in ARCHITECTURES:
        return "native"
    if requested == "native":
        raise ValueError(f"--train-model-impl native: {model_path} is a {architecture}, which sluice's model code "
                         f"does not implement (it has {', '.join(ARCHITECTURES)}); use --train-model-impl hf")
    return "hf"


def _architectures(model_path: str) -> list[str]:
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("architectures") or []
    return list(getattr(AutoConfig.from_pretrained(model_path), "architectures", None) or [])


def load_native(path: str, device: torch.device, load_device: torch.device | None = None) -> DecoderLM:
    """The checkpoint's weights in a trainable decoder: float32 parameters (the master weights), ops compiled on
    GPU. Compute runs in the dtype of the caller's ``torch.autocast``. ``load_device`` (default ``device``): where
    the weights load, for a caller that places them itself (--optimizer-cpu-offload); the ops are ``device``'s."""
    model = load_model(path, load_device or device, torch.float32)
    return _trainable(model, device)


def _trainable(model: DecoderLM, device: torch.device) -> DecoderLM:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.ops = decoder_ops(device)
    return model.train()


def recompute_plan(granularity: str | None, method: str, num_layers: int) -> RecomputePlan | None:
    return None if granularity is None else RecomputePlan(granularity, method, num_layers)


class NativeForward:
    """Per-token logprobs (and entropy) of packed rows through the native model: see ``token_logprobs``."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype, chunk_size: int | None,
                 recompute: RecomputePlan | None):
        self.device, self.compute_dtype = device, compute_dtype
        self.chunk_size, self.recompute = chunk_size, recompute
        self._rotate = compile_op(eager_rotary) if device.type == "cuda" else eager_rotary

    def token_logprobs(self, model: DecoderLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``log softmax(logits / temperature)`` of each next token ``[B, T-1]`` (0 past each row's end) and its
        entropy, for right-padded rows: the same contract as ``model_logprobs.token_logprobs``.

        The rows run as one packed sequence set; the LM head runs only at the positions that have a target.
        The rows may be given on the host (the trainer passes them so): the packing's index arithmetic, whose
        sizes depend on the data, then runs there and its results go to the device without waiting for it, so
        the micro-batches of a step queue up on the GPU back to back.
        """
        packing = pack_rows(input_ids, attention_mask)
        lengths = attention_mask.sum(dim=1)
        max_len = int(lengths.max()) if lengths.numel() else 0  # a host read when the rows are on the host
        rows = packing.target_index[packing.target_valid]  # packed position t predicts packed token t + 1
        tokens, positions = packing.input_ids[0], packing.position_ids[0]
        targets, shape = tokens[rows + 1], packing.target_valid.shape
        slots = packing.target_valid.reshape(-1).nonzero().squeeze(1)  # where each target's value goes in [B, T-1]
        cu_seqlens = cu_seqlens_from_lengths(lengths)
        offsets = tuple(cu_seqlens.tolist()) if cu_seqlens.device.type == "cpu" else None
        tokens, positions, rows, targets, slots, cu_seqlens = (  # no-ops for rows already on the device
            tensor_to_device(t, self.device) for t in (tokens, positions, rows, targets, slots, cu_seqlens))
        attention = PackedCausalAttention(cu_seqlens, max_len, norm=model.ops.rms_norm, rotate=self._rotate,
                                          offsets=offsets)

        def head(hidden: torch.Tensor, weight: torch.Tensor):
            with torch.autocast(self.device.type, enabled=False):  # the chunked head picks its own dtypes
                return token_logprobs_from_hidden(hidden[rows], weight.to(hidden.dtype), targets,
                                                  temperature, with_entropy=with_entropy, chunk_size=self.chunk_size)

        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            log_probs, entropy = model(tokens, positions, attention, recompute=self.recompute, head=head)
        return _scatter(log_probs, slots, shape), (_scatter(entropy, slots, shape) if entropy is not None else None)


def _scatter(values: torch.Tensor, slots: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Values of the valid targets (row-major) at their flat ``slots`` -> ``shape`` float32 with 0 elsewhere."""
    out = torch.zeros(shape.numel(), dtype=torch.float32, device=values.device)
    return out.index_put((slots,), values.float()).view(shape)


def hf_state(model: DecoderLM, state: dict[str, torch.Tensor], with_tied_head: bool = False) -> dict[str, torch.Tensor]:
    """A state dict of ``model`` (native names) under HF names (views; see ``models/hf_layout.py``).
    ``with_tied_head`` adds ``lm_head.weight`` (the embedding) to a tied model's, as the HF class's state dict
    has it, so a checkpoint loads into either model code."""
    out = to_hf(state, split_sizes(model), model.tie_word_embeddings)
    if with_tied_head and model.tie_word_embeddings and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def native_state(model: DecoderLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named tensors -> a state dict ``model`` loads."""
    return from_hf(state, model.tie_word_embeddings)
