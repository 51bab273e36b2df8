"""Packed micro-batches (--use-dynamic-batch-size): the packed layout by hand, sequence isolation in a real model,
and the same loss and gradients as padded batches, for one or many micro-batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.config import AlgorithmConfig, TrainConfig
from sluice.trainer.batching import collate, micro_batch_rows
from sluice.trainer.model_logprobs import token_logprobs
from sluice.trainer.packing import pack_rows, token_budget_rows
from sluice.trainer.torch_backend import TorchTrainer
from helpers.trainer import PAD, make_trainer, ppo_batch, random_samples, run_step

IDS = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def test_pack_rows_layout_by_hand():
    packing = pack_rows(IDS, MASK)
    assert packing.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert packing.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # Row b starts at packed position 0, 3, 5; target t of row b is read at start_b + t while t < L_b - 1.
    assert packing.target_index.tolist() == [[0, 1, 2], [3, 4, 5], [5, 6, 7]]
    assert packing.target_valid.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    # A per-position output of the packed row (here: the packed position itself) lands in the padded layout.
    unpacked = packing.unpack(torch.arange(8.0))
    assert unpacked.tolist() == [[0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [5.0, 6.0, 7.0]]


def test_token_budget_rows_first_fit_decreasing():
    lengths = torch.tensor([5, 9, 3, 12, 4, 2])
    bins = [rows.tolist() for rows in token_budget_rows(lengths, max_tokens=10)]
    # Longest first, each into the first micro-batch with room: 12 alone (over the budget), 9 new, 5 new,
    # 4 joins 5 (9), 3 fits nowhere (room 1 left in 9 and 5 + 4) -> new, 2 likewise skips those -> joins 3.
    assert bins == [[3], [1], [0, 4], [2, 5]]
    assert sorted(r for b in bins for r in b) == list(range(6))
    assert all(int(lengths[b].sum()) <= 10 for b in bins if len(b) > 1)


def test_packed_rows_do_not_see_each_other(lively_checkpoint):
    """Packed logprobs equal one plain forward per sequence, and changing one sequence leaves the others alone."""
    model = AutoModelForCausalLM.from_pretrained(lively_checkpoint, dtype=torch.float32).eval()
    samples, advantages = random_samples(5, seed=2)
    batch = collate(samples, advantages, PAD)
    with torch.no_grad():
        packed, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, 0.7, packed=True)
        for row, sample in enumerate(samples):
            ids = torch.tensor([sample.tokens])
            alone, _ = token_logprobs(model, ids, torch.ones_like(ids), 0.7)
            torch.testing.assert_close(packed[row, : len(sample.tokens) - 1], alone[0], atol=2e-5, rtol=0)
            assert torch.all(packed[row, len(sample.tokens) - 1 :] == 0)
        changed = batch.input_ids.clone()
        changed[0, : len(samples[0].tokens)] = 7  # rewrite the whole first sequence
        again, _ = token_logprobs(model, changed, batch.attention_mask, 0.7, packed=True)
    torch.testing.assert_close(again[1:], packed[1:], atol=2e-5, rtol=0)
    assert not torch.allclose(again[0], packed[0])


# Padded with one micro-batch is the reference; packed with one big or many small micro-batches must match it.
# (Padded 1 vs 4 micro-batches is tests/test_trainer.py's micro-batch test.)
LAYOUTS = {
    "padded-1": dict(micro=8),
    "packed-1": dict(micro=1, use_dynamic_batch_size=True, max_tokens_per_gpu=10_000),
    "packed-many": dict(micro=1, use_dynamic_batch_size=True, max_tokens_per_gpu=24),
}


@pytest.mark.parametrize("overrides", [
    dict(entropy_coef=0.01),
    dict(loss_type="sft_loss", loss_agg_mode="seq_mean_token_mean"),
], ids=["ppo-entropy-token_mean", "sft-seq_mean_token_mean"])
def test_packed_and_padded_give_the_same_loss_and_gradients(small_checkpoint, overrides):
    """Tolerance: metrics rel 1e-5 (abs 1e-6), gradients atol 1e-6 / rtol 1e-4, as the micro-batch tests: packing
    changes matmul shapes, so float32 sums round differently (~1e-7 relative), nothing more."""
    algorithm = AlgorithmConfig(**{"eps_clip": 0.2, "eps_clip_high": 0.28, **overrides})
    results = {}
    for name, layout in LAYOUTS.items():
        layout = dict(layout)
        trainer = make_trainer(small_checkpoint, micro=layout.pop("micro"), lr=1e-3, algorithm=algorithm,
                               clip_grad=0.0, **layout)
        batch = ppo_batch(trainer)
        if name == "packed-many":
            assert len(micro_batch_rows(batch.attention_mask, trainer.config)) >= 4
        results[name] = run_step(trainer, batch)
    reference_metrics, reference_grads = results["padded-1"]
    assert reference_metrics["train/loss"] != 0.0
    for name, (metrics, grads) in results.items():
        for key, value in reference_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
        for param in reference_grads:
            torch.testing.assert_close(grads[param], reference_grads[param], atol=1e-6, rtol=1e-4, msg=(name, param))


def test_old_logprobs_of_the_packed_layout_match_the_padded_ones(small_checkpoint):
    padded = make_trainer(small_checkpoint, micro=3)
    packed = make_trainer(small_checkpoint, micro=1, use_dynamic_batch_size=True, max_tokens_per_gpu=20)
    samples, advantages = random_samples(8, seed=4)
    batch = collate(samples, advantages, PAD)
    real = batch.attention_mask[:, 1:].bool()
    torch.testing.assert_close(packed.compute_logprobs(batch)[real], padded.compute_logprobs(batch)[real],
                               atol=1e-5, rtol=0)


def test_train_config_defaults_pack_under_a_derived_budget(small_checkpoint):
    """Packed micro-batches by default; with no --max-tokens-per-gpu the trainer derives the budget (a fixed one
    on CPU, see trainer/token_budget.py)."""
    from sluice.trainer.token_budget import CPU_TOKEN_BUDGET

    assert TrainConfig().use_dynamic_batch_size is True and TrainConfig().max_tokens_per_gpu is None
    trainer = TorchTrainer(small_checkpoint, TrainConfig(train_device="cpu"), AlgorithmConfig(), temperature=1.0)
    assert trainer.packed and trainer.config.max_tokens_per_gpu == CPU_TOKEN_BUDGET
