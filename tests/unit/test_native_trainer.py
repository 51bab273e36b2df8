"""The trainer's native model (sluice's decoder, packed varlen attention, chunked LM head) against the Hugging
Face transformers class, in float32 on CPU: logprobs, entropy and every parameter's gradient agree for Qwen2,
Qwen3 and Llama; and the training knobs (packing, chunk size, activation checkpointing, micro-batch count)
change nothing but rounding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.models.hf_layout import from_hf, split_sizes, to_hf
from sluice.trainer.model_logprobs import token_logprobs
from sluice.trainer.native_model import NativeForward, load_native, recompute_plan, resolve_model_impl
from sluice.trainer.torch_backend import TorchTrainer
from sluice.types import TrainBatch

_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=False),
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 32}),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory) -> str:
    """A random-weight checkpoint of each family (std 0.2: outputs depend on the context)."""
    config = CONFIGS[request.param]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path)


def _rows(lengths: list[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random rows (padding id 0) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, vocab, (length,), generator=generator)
        mask[row, :length] = 1
    return input_ids, mask


def _loss(log_probs: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(0.5, 1.5, log_probs.numel()).reshape(log_probs.shape)
    return ((log_probs * weights + 0.1 * entropy) * valid).sum()


def _hf_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_native_matches_hf_logprobs_entropy_and_every_gradient(checkpoint):
    lengths = [9, 17, 4, 12]
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    input_ids, mask = _rows(lengths, hf.config.vocab_size)
    valid = (torch.arange(input_ids.shape[1] - 1) < (torch.tensor(lengths) - 1)[:, None]).float()
    hf_lp, hf_ent = token_logprobs(hf, input_ids, mask, temperature=0.7, with_entropy=True)
    _loss(hf_lp, hf_ent, valid).backward()

    native = load_native(checkpoint, torch.device("cpu"))
    forward = NativeForward(torch.device("cpu"), torch.float32, chunk_size=5, recompute=None)
    lp, ent = forward.token_logprobs(native, input_ids, mask, temperature=0.7, with_entropy=True)
    _loss(lp, ent, valid).backward()

    assert (lp - hf_lp * valid).abs().max() < 1e-5
    assert (ent - hf_ent * valid).abs().max() < 1e-5
    native_grads = to_hf({n: p.grad for n, p in native.named_parameters()}, split_sizes(native),
                         native.tie_word_embeddings)
    expected = _hf_grads(hf)
    assert set(native_grads) == set(expected)
    for name, grad in expected.items():
        relative = (native_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert relative < 1e-4, (name, relative.item())


def test_hf_layout_round_trips_and_rejects_a_missing_part(checkpoint):
    native = load_native(checkpoint, torch.device("cpu"))
    state = native.state_dict()
    hf_named = to_hf(state, split_sizes(native), native.tie_word_embeddings)
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint)
    expected = {k: v for k, v in hf_model.state_dict().items() if not (native.tie_word_embeddings and k == "lm_head.weight")}
    assert set(hf_named) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(hf_named[name], tensor), name
    back = from_hf(hf_named, native.tie_word_embeddings)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    broken = dict(hf_named)
    del broken["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        from_hf(broken, native.tie_word_embeddings)


@pytest.mark.parametrize("variant", ["chunk-1", "chunk-all", "recompute-full", "recompute-block", "recompute-selective"])
def test_training_knobs_change_nothing_but_rounding(checkpoint, variant):
    """Chunked vs unchunked head and activation checkpointing (full uniform, full block, selective): the same
    logprobs and gradients as the plain native pass."""
    lengths = [7, 13, 5]
    native = load_native(checkpoint, torch.device("cpu"))
    input_ids, mask = _rows(lengths, native.config.vocab_size, seed=3)
    valid = (torch.arange(input_ids.shape[1] - 1) < (torch.tensor(lengths) - 1)[:, None]).float()

    def run(chunk_size, plan):
        native.zero_grad(set_to_none=True)
        forward = NativeForward(torch.device("cpu"), torch.float32, chunk_size, plan)
        lp, ent = forward.token_logprobs(native, input_ids, mask, temperature=1.0, with_entropy=True)
        _loss(lp, ent, valid).backward()
        return lp.detach(), {n: p.grad.clone() for n, p in native.named_parameters()}

    base_lp, base_grads = run(None, None)
    chunk, plan = {
        "chunk-1": (1, None),
        "chunk-all": (10_000, None),
        "recompute-full": (None, recompute_plan("full", "uniform", 2)),
        "recompute-block": (None, recompute_plan("full", "block", 1)),
        "recompute-selective": (None, recompute_plan("selective", "uniform", 1)),
    }[variant]
    lp, grads = run(chunk, plan)
    assert (lp - base_lp).abs().max() < 1e-6
    for name, grad in base_grads.items():
        assert (grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_recompute_plan_segments_cover_every_layer_once():
    assert recompute_plan("full", "uniform", 2).segments(5) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert recompute_plan("full", "block", 2).segments(5) == [(0, 1, True), (1, 2, True), (2, 5, False)]
    assert recompute_plan("full", "block", 9).segments(3) == [(0, 1, True), (1, 2, True), (2, 3, True)]
    assert recompute_plan("selective", "uniform", 1).segments(4) == [(0, 4, False)]


def _trainer(checkpoint, **train) -> TorchTrainer:
    config = TrainConfig(lr=1e-2, seed=0, train_device="cpu", **train)
    return TorchTrainer(checkpoint, config, AlgorithmConfig(), temperature=1.0)


def _step_gradients(trainer: TorchTrainer) -> dict[str, torch.Tensor]:
    """Filled at the trainer's next optimizer step: every parameter's gradient as the optimizer sees it (Adam's
    first step moves every weight by about +-lr whatever the gradient's size, so weights compare poorly)."""
    grads: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}

    def snapshot(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            grads.update({names[id(p)]: p.grad.clone() for p in group["params"] if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(snapshot)
    return grads


def _batch(vocab: int) -> TrainBatch:
    lengths = [11, 6, 14, 9, 3, 12, 8, 10]
    input_ids, mask = _rows(lengths, vocab, seed=5)
    generator = torch.Generator().manual_seed(6)
    loss_mask = torch.zeros(len(lengths), input_ids.shape[1] - 1)
    for row, length in enumerate(lengths):
        loss_mask[row, 1 : length - 1] = 1.0  # the response: everything after the first target
    advantages = torch.randn(len(lengths), 1, generator=generator).expand_as(loss_mask) * loss_mask
    return TrainBatch(input_ids, mask, loss_mask, advantages.contiguous(), torch.zeros_like(loss_mask))


@pytest.mark.parametrize("layout", [dict(max_tokens_per_gpu=16), dict(max_tokens_per_gpu=40),
                                    dict(use_dynamic_batch_size=False, micro_batch_size=2),
                                    dict(use_dynamic_batch_size=False, micro_batch_size=8)])
def test_micro_batch_layout_gives_the_same_step(checkpoint, layout):
    """Packed under tight and loose budgets (several vs few micro-batches) and padded rows: one optimizer step
    gives the same loss, gradient norm and weights as a single packed micro-batch."""
    one = _trainer(checkpoint, max_tokens_per_gpu=10_000)
    other = _trainer(checkpoint, **layout)
    assert one.impl == other.impl == "native"
    batch = _batch(one.model.config.vocab_size)
    grads_one, grads_other = _step_gradients(one), _step_gradients(other)
    expected = one.train_step(batch)
    actual = other.train_step(batch)
    assert actual["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-5, abs=1e-7)
    assert actual["train/grad_norm"] == pytest.approx(expected["train/grad_norm"], rel=1e-5)
    assert grads_one and set(grads_one) == set(grads_other)
    for name, grad in grads_one.items():
        assert (grads_other[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_native_and_hf_trainers_take_the_same_step(checkpoint):
    native, hf = _trainer(checkpoint), _trainer(checkpoint, train_model_impl="hf")
    assert (native.impl, hf.impl) == ("native", "hf")
    batch = _batch(native.model.config.vocab_size)
    assert torch.allclose(native.compute_logprobs(batch), hf.compute_logprobs(batch), atol=1e-5)
    native_grads, hf_grads = _step_gradients(native), _step_gradients(hf)
    native_metrics, hf_metrics = native.train_step(batch), hf.train_step(batch)
    assert native_metrics["train/loss"] == pytest.approx(hf_metrics["train/loss"], rel=1e-5)
    assert native_metrics["train/grad_norm"] == pytest.approx(hf_metrics["train/grad_norm"], rel=1e-4)
    as_hf = to_hf(native_grads, split_sizes(native.model), native.model.tie_word_embeddings)
    for name, grad in hf_grads.items():
        assert (as_hf[name] - grad).norm() <= 1e-4 * grad.norm(), name


def test_checkpoints_hold_hf_names_and_resume_across_trainers(checkpoint, tmp_path):
    trainer = _trainer(checkpoint)
    batch = _batch(trainer.model.config.vocab_size)
    trainer.train_step(batch)
    state = trainer.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in state["model"] and state["model_impl"] == "native"
    resumed = _trainer(checkpoint)
    resumed.load_state_dict(state)
    assert resumed.train_step(batch)["train/loss"] == pytest.approx(trainer.train_step(batch)["train/loss"], rel=1e-6)
    hf = _trainer(checkpoint, train_model_impl="hf")
    with pytest.raises(ValueError, match="--train-model-impl native"):
        hf.load_state_dict(state)
    hf.load_state_dict({**state, "optimizer": None})  # the weights alone load into the HF class
    trainer.save_hf(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for name, tensor in trainer.named_weights().items():
        assert torch.equal(exported.state_dict()[name], tensor), name


def test_auto_picks_native_where_implemented_and_native_refuses_other_families(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert resolve_model_impl("auto", str(tmp_path)) == "hf"
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*--train-model-impl hf"):
        resolve_model_impl("native", str(tmp_path))


def test_bf16_compute_keeps_float32_master_weights(checkpoint):
    trainer = _trainer(checkpoint, train_dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    batch = _batch(trainer.model.config.vocab_size)
    gap = (trainer.compute_logprobs(batch) - _trainer(checkpoint).compute_logprobs(batch)).abs().max()
    assert 0 < gap < 0.1  # bf16 rounding, nothing worse
    metrics = trainer.train_step(batch)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and metrics["train/grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(t.dtype == torch.bfloat16 for t in trainer.named_weights().values())
    exp_avg = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert exp_avg and all(m.dtype == torch.float32 for m in exp_avg)


def _saved_bytes(model, tokens: int) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one packed sequence (bf16 autocast), weights
    and their bf16 copies included: take differences over token counts to cancel them."""
    from sluice.models.packed_attention import PackedCausalAttention, cu_seqlens_from_lengths

    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    attention = PackedCausalAttention(cu_seqlens_from_lengths([tokens]), tokens)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randint(0, 100, (tokens,)), torch.arange(tokens), attention)
    return sum(storages.values())


def test_token_budget_estimate_matches_what_autograd_saves_and_counts_recompute_segments():
    """The default --max-tokens-per-gpu divides free memory by ``activation_bytes_per_token``: an estimate far
    below what a token really keeps runs out of memory, far above it wastes micro-batch size."""
    from sluice.models.decoder import DecoderLM, RecomputePlan
    from sluice.trainer.token_budget import CPU_TOKEN_BUDGET, DecoderShape, activation_bytes_per_token, derived_token_budget

    # the Qwen2.5-0.5B proportions (hidden 896, 14 x 64 query and 2 x 64 KV heads, FFN 4864), scaled down
    config = Qwen2Config(vocab_size=128, hidden_size=224, intermediate_size=1216, num_hidden_layers=3,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=16)
    model = DecoderLM(config, qk_norm=False, qkv_bias=True, o_bias=False, max_positions=1024)
    shape = DecoderShape.of(config)
    measured = (_saved_bytes(model, 512) - _saved_bytes(model, 256)) / 256
    estimate = activation_bytes_per_token(shape, 2)
    assert 0.95 * measured <= estimate <= 1.2 * measured, (estimate, measured)
    # Recompute (not measurable through the hooks: a non-reentrant checkpoint keeps its inputs itself). A
    # checkpointed segment keeps its two inputs (hidden state and residual), and the backward rebuilds one whole
    # segment at a time, so larger groups keep more.
    per_layer = estimate // 3
    every_layer = RecomputePlan("full", "uniform", 1).segments(3)
    assert activation_bytes_per_token(shape, 2, every_layer) == per_layer + 2 * (3 * 2 * 224)
    in_pairs = RecomputePlan("full", "uniform", 2).segments(3)  # layers [0, 2) and [2, 3)
    assert activation_bytes_per_token(shape, 2, in_pairs) == 2 * per_layer + 2 * (2 * 2 * 224)
    first_only = RecomputePlan("full", "block", 1).segments(3)  # layer 0 recomputed, 1 and 2 stored
    assert activation_bytes_per_token(shape, 2, first_only) == 3 * per_layer + 2 * (2 * 224)
    assert activation_bytes_per_token(shape, 2, RecomputePlan("selective").segments(3)) == estimate
    assert derived_token_budget(torch.device("cpu"), shape, pending_step_bytes=120, element_bytes=2) == CPU_TOKEN_BUDGET


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_down_gives_the_plain_gradients_and_keeps_a_third_less(bias):
    """The MLP's custom backward (models/decoder.py: SwiGLUDown) against autograd through the plain composition:
    the same output and gradients (float64), and no stored SwiGLU output."""
    from sluice.models.decoder import SwiGLUDown
    from sluice.models.fused import EAGER_OPS, silu_and_mul

    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(37, 2 * 24, generator=generator, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(16, 24, generator=generator, dtype=torch.float64).requires_grad_(True)
    bias_t = torch.randn(16, generator=generator, dtype=torch.float64).requires_grad_(True) if bias else None
    upstream = torch.randn(37, 16, generator=generator, dtype=torch.float64)
    leaves = [gate_up, weight] + ([bias_t] if bias else [])

    plain = torch.nn.functional.linear(silu_and_mul(gate_up), weight, bias_t)
    expected = torch.autograd.grad(plain, leaves, upstream)
    fused = SwiGLUDown.apply(gate_up, weight, bias_t, EAGER_OPS)
    got = torch.autograd.grad(fused, leaves, upstream)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda g, w: SwiGLUDown.apply(g, w, None, EAGER_OPS),
                                    (gate_up[:5].detach().requires_grad_(True), weight.detach().requires_grad_(True)))

    saved: list[int] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        SwiGLUDown.apply(gate_up, weight, bias_t, EAGER_OPS)
    assert sorted(saved) == sorted([gate_up.numel(), weight.numel()])  # no [T, intermediate] output kept
