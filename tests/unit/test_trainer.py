"""The trainer: hand-computed losses, collate layout, logprobs vs. a plain HF forward, micro-batch invariance,
and the state_dict round trip. Real tiny Qwen2 checkpoints on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.config import AlgorithmConfig
from sluice.trainer.batching import collate, split
from sluice.trainer.loss import micro_batch_loss
from sluice.types import Sample

from helpers.hand_loss import ENTROPY, NUM_TOKENS, PG_A, PG_B, PG_C, PG_D, hand_batch
from helpers.trainer import PAD, make_trainer, ppo_batch, random_samples, run_step


# ------------------------------------------------------------------------------------- hand-computed loss
def test_ppo_clip_loss_matches_hand_computation_with_clip_higher():
    config = AlgorithmConfig(eps_clip=0.2, eps_clip_high=0.28)
    batch, log_probs = hand_batch()
    loss, metrics = micro_batch_loss(config, batch, log_probs, None, NUM_TOKENS, 2)
    expected = (PG_A + PG_B + PG_C + PG_D) / NUM_TOKENS
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["train/loss"] == pytest.approx(expected, abs=1e-6)
    assert metrics["train/pg_loss"] == pytest.approx(expected, abs=1e-6)
    assert metrics["train/clipfrac"] == pytest.approx(2 / 4)  # tokens b and c
    assert metrics["train/ppo_kl"] == pytest.approx((-0.1 - 0.4 + 0.3 + 0.0) / 4, abs=1e-6)  # mean(old - new)
    assert "train/kl_loss" not in metrics and "train/entropy" not in metrics

    loss.backward()
    # d loss / d logp = -A * r / N for unclipped tokens, 0 for clipped and masked-out ones.
    expected_grad = [[0.0, -math.exp(0.1) / 4, 0.0], [0.0, 0.5 / 4, 0.0]]
    torch.testing.assert_close(log_probs.grad, torch.tensor(expected_grad), atol=1e-6, rtol=0)


def test_ppo_clip_symmetric_default_clips_at_1_2():
    batch, log_probs = hand_batch()
    loss, _ = micro_batch_loss(AlgorithmConfig(), batch, log_probs, None, NUM_TOKENS, 2)  # eps_clip_high None
    assert loss.item() == pytest.approx((PG_A - 1.2 + PG_C + PG_D) / NUM_TOKENS, abs=1e-6)


def test_loss_divides_by_the_step_token_count_not_the_micro_batch():
    """Each micro-batch is divided by the whole step's token count, so the halves add up to the whole."""
    config = AlgorithmConfig(eps_clip=0.2, eps_clip_high=0.28)
    batch, log_probs = hand_batch()
    halves = [micro_batch_loss(config, batch.select(slice(i, i + 1)), log_probs[i : i + 1], None, NUM_TOKENS, 2)[0]
              for i in range(2)]
    assert halves[0].item() == pytest.approx((PG_A + PG_B) / 4, abs=1e-6)
    assert halves[1].item() == pytest.approx((PG_C + PG_D) / 4, abs=1e-6)


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
def test_kl_and_entropy_terms_match_hand_computation(kl_type):
    config = AlgorithmConfig(eps_clip=0.2, eps_clip_high=0.28, use_kl_loss=True, kl_loss_coef=0.1,
                             kl_loss_type=kl_type, entropy_coef=0.01)
    batch, log_probs = hand_batch(with_ref=True)
    entropy = torch.tensor(ENTROPY)
    loss, metrics = micro_batch_loss(config, batch, log_probs, entropy, NUM_TOKENS, 2)

    # d = logp - ref_logp on tokens a, b, c, d: -1.0+1.2, -0.6+0.5, -1.3+1.0, -0.7+1.0
    d = [0.2, -0.1, -0.3, 0.3]
    if kl_type == "k1":
        kl = d
    else:  # k3 = exp(ref - logp) - (ref - logp) - 1
        kl = [math.exp(-x) + x - 1 for x in d]
    ent = [2.0, 1.5, 1.0, 0.5]
    pg = [PG_A, PG_B, PG_C, PG_D]
    expected = sum(p + 0.1 * k - 0.01 * e for p, k, e in zip(pg, kl, ent)) / NUM_TOKENS
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["train/kl_loss"] == pytest.approx(sum(kl) / 4, abs=1e-6)
    assert metrics["train/entropy"] == pytest.approx(sum(ent) / 4, abs=1e-6)
    assert metrics["train/pg_loss"] == pytest.approx(sum(pg) / 4, abs=1e-6)


def test_sft_loss_is_token_mean_nll():
    batch, log_probs = hand_batch()
    loss, metrics = micro_batch_loss(AlgorithmConfig(loss_type="sft_loss"), batch, log_probs, None, NUM_TOKENS, 2)
    assert loss.item() == pytest.approx((1.0 + 0.6 + 1.3 + 0.7) / 4, abs=1e-6)
    assert "train/pg_loss" not in metrics


# ----------------------------------------------------------------------------------------------- collate
def test_collate_layout_is_hand_checked():
    samples = [
        Sample(prompt="a", prompt_tokens=[5, 6, 7], tokens=[5, 6, 7, 8, 9], rollout_log_probs=[-0.1, -0.2],
               reward=1.0),
        # response of 3 tokens whose middle one is tool output (loss mask 0)
        Sample(prompt="b", prompt_tokens=[5, 6], tokens=[5, 6, 10, 11, 12], loss_mask=[1, 0, 1],
               rollout_log_probs=[-0.3, -0.4, -0.5], reward=0.0),
        Sample(prompt="c", prompt_tokens=[3, 4], tokens=[3, 4, 7], rollout_log_probs=[-0.6], reward=0.5),
    ]
    batch = collate(samples, [0.5, -1.5, 2.0], pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 10, 11, 12], [3, 4, 7, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # target position t predicts input_ids[:, t + 1]: response token j of a prompt of length P is at P - 1 + j
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 0, 0]]
    assert batch.advantages.tolist() == [[0, 0, 0.5, 0.5], [0, -1.5, -1.5, -1.5], [0, 2.0, 0, 0]]
    torch.testing.assert_close(batch.rollout_log_probs, torch.tensor(
        [[0, 0, -0.1, -0.2], [0, -0.3, -0.4, -0.5], [0, -0.6, 0, 0]]))
    assert batch.rewards.tolist() == [1.0, 0.0, 0.5]
    # the targets under the loss mask are exactly the response tokens that are trained
    targets = batch.input_ids[:, 1:][batch.loss_mask.bool()].tolist()
    assert targets == [8, 9, 10, 12, 7]

    micro = batch.select(slice(2, 3))  # the short row alone: padding columns past its length are cut
    assert micro.input_ids.tolist() == [[3, 4, 7]]
    assert micro.loss_mask.tolist() == [[0, 1]]
    assert [m.num_samples for m in split(batch, 2)] == [2, 1]


# ----------------------------------------------------------------------------------- tiny-model trainer
def test_compute_logprobs_matches_plain_hf_forward(small_checkpoint):
    trainer = make_trainer(small_checkpoint, micro=3, temperature=0.7)
    samples, advantages = random_samples(5, seed=1)
    batch = collate(samples, advantages, PAD)
    got = trainer.compute_logprobs(batch)
    assert got.shape == batch.loss_mask.shape

    model = AutoModelForCausalLM.from_pretrained(small_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        for row, sample in enumerate(samples):
            ids = torch.tensor([sample.tokens])
            log_softmax = torch.log_softmax(model(input_ids=ids).logits[0].float() / 0.7, dim=-1)
            start = len(sample.prompt_tokens) - 1
            for j, token in enumerate(sample.response_tokens):
                assert got[row, start + j].item() == pytest.approx(log_softmax[start + j, token].item(), abs=1e-5)
            # every real target position matches, not only the response ones
            expected = log_softmax[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
            torch.testing.assert_close(got[row, : len(sample.tokens) - 1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type", ["policy_loss", "sft_loss"])
def test_micro_batch_size_does_not_change_loss_gradients_or_update(small_checkpoint, loss_type):
    algorithm = AlgorithmConfig(eps_clip=0.2, eps_clip_high=0.28, loss_type=loss_type)
    results = {}
    for micro in (1, 4, 8):
        trainer = make_trainer(small_checkpoint, micro=micro, lr=1e-3, algorithm=algorithm, clip_grad=0.0)
        batch = ppo_batch(trainer)
        metrics, grads = run_step(trainer, batch)
        params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        results[micro] = (batch, metrics, grads, params)

    batch8, metrics8, grads8, params8 = results[8]
    assert metrics8["train/loss"] != 0.0
    if loss_type == "policy_loss":
        assert 0.0 < metrics8["train/clipfrac"] < 1.0  # both the clipped and the unclipped branch are in play
    assert all(g.abs().sum() > 0 for g in grads8.values())
    for micro in (1, 4):
        batch, metrics, grads, params = results[micro]
        real = batch8.attention_mask[:, 1:].bool()  # off the sequence (padding) the values are meaningless
        torch.testing.assert_close(batch.old_log_probs[real], batch8.old_log_probs[real], atol=1e-5, rtol=0)
        for key in ("train/loss", "train/pg_loss", "train/clipfrac", "train/ppo_kl", "train/entropy",
                    "train/grad_norm"):
            if key in metrics8:
                assert metrics[key] == pytest.approx(metrics8[key], rel=1e-5, abs=1e-6), key
        for name in grads8:
            torch.testing.assert_close(grads[name], grads8[name], atol=1e-6, rtol=1e-4, msg=name)
            torch.testing.assert_close(params[name], params8[name], atol=1e-5, rtol=0, msg=name)


def test_sft_loss_of_a_step_is_mean_nll_of_the_trained_tokens(small_checkpoint):
    trainer = make_trainer(small_checkpoint, micro=3, temperature=1.0, algorithm=AlgorithmConfig(loss_type="sft_loss"))
    samples, advantages = random_samples(6, seed=3)
    batch = collate(samples, advantages, PAD)
    log_probs = trainer.compute_logprobs(batch)
    expected = -(log_probs * batch.loss_mask).sum() / batch.loss_mask.sum()
    metrics = trainer.train_step(batch)
    assert metrics["train/loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_train_step_moves_logprobs_in_the_direction_of_the_advantage(small_checkpoint):
    samples, _ = random_samples(4, seed=5)

    def mean_change(rows: list, advantages: list[float]) -> torch.Tensor:
        trainer = make_trainer(small_checkpoint, micro=4, lr=1e-3, temperature=1.0)
        batch = collate(rows, advantages, PAD)
        before = trainer.compute_logprobs(batch)
        trainer.train_step(batch)
        mask = batch.loss_mask.bool()
        return ((trainer.compute_logprobs(batch) - before) * mask).sum(dim=1) / mask.sum(dim=1)

    # One sequence alone: a small step must raise its logprob for A > 0 and lower it for A < 0.
    assert mean_change(samples[:1], [1.0])[0] > 0
    assert mean_change(samples[:1], [-1.0])[0] < 0
    # Several sequences share parameters, so only the advantage-weighted change is guaranteed to rise.
    advantages = [1.0, 1.0, -1.0, -1.0]
    assert (mean_change(samples, advantages) * torch.tensor(advantages)).sum() > 0


def test_state_dict_round_trip_restores_parameters_and_optimizer(small_checkpoint, tmp_path):
    trainer = make_trainer(small_checkpoint, micro=4, lr=1e-2, lr_warmup_iters=3)
    samples, advantages = random_samples(8, seed=7)
    batch1 = collate(samples[:4], advantages[:4], PAD)
    batch2 = collate(samples[4:], advantages[4:], PAD)
    trainer.train_step(batch1)
    torch.save(trainer.state_dict(), tmp_path / "state.pt")  # as save_checkpoint does
    params1 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    lr1 = trainer.scheduler.get_last_lr()[0]
    trainer.train_step(batch2)
    params2 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert any(not torch.equal(params1[n], params2[n]) for n in params1)

    restored = make_trainer(small_checkpoint, micro=4, lr=1e-2, lr_warmup_iters=3)
    restored.train_step(batch2)  # a different history, overwritten by the load
    restored.train_step(batch2)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    for name, value in restored.model.named_parameters():
        torch.testing.assert_close(value.detach(), params1[name], atol=0, rtol=0, msg=name)
    assert restored.num_optimizer_steps == 1
    steps = {float(state["step"]) for state in restored.optimizer.state.values()}
    assert steps == {1.0}
    assert restored.scheduler.get_last_lr()[0] == pytest.approx(lr1)
    assert lr1 == pytest.approx(1e-2 * 2 / 3)  # warmup: after one step the lambda is (1 + 1) / 3

    # The restored trainer continues exactly as the original did (same Adam moments, same lr schedule).
    restored.train_step(batch2)
    for name, value in restored.model.named_parameters():
        torch.testing.assert_close(value.detach(), params2[name], atol=1e-7, rtol=0, msg=name)
