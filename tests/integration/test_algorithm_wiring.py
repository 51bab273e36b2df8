"""The algorithm flags wired into the trainer: policy loss by estimator, --loss-agg-mode with step-global
counts, dual clip, TIS, old-logprob choice and the rollout-logprob mismatch metric, and a few-step learning
run per estimator family."""

from __future__ import annotations

import math

import pytest
import torch

from sluice.config import AlgorithmConfig
from sluice.observability.metrics import read_metrics
from sluice.trainer.loss import REF_KL, ROLLOUT_LOGPROB_ABS_DIFF, ROLLOUT_POLICY_KL, micro_batch_loss
from sluice.trainer.update import update_policy
from sluice.types import TrainBatch
from helpers.train_loop import flags, run_loop
from sluice.trainer.batching import collate
from helpers.stub_trainer import REWARDS, RecordingTrainer, groups_of
from helpers.trainer import PAD, make_trainer, ppo_batch, random_samples, run_step

MAX_LEN = 8  # random_samples' longest response

# The engine passes `past_key_values`, which newer transformers rename (see test_train_loop).
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


# ------------------------------------------------------------------------------ micro-batch invariance
def with_rollout_log_probs(batch: TrainBatch) -> TrainBatch:
    """Engine logprobs a little off the trainer's old ones, so TIS weights differ from 1 and some clip."""
    noise = torch.empty_like(batch.old_log_probs).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(1))
    batch.rollout_log_probs = (batch.old_log_probs + noise) * batch.loss_mask
    return batch


INVARIANCE_CASES = [
    *(dict(loss_agg_mode=mode) for mode in
      ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")),
    dict(advantage_estimator="gspo", loss_agg_mode="seq_mean_token_mean"),
    dict(advantage_estimator="gspo", loss_agg_mode="token_mean"),
    dict(advantage_estimator="cispo", eps_clip=1.0),
    dict(eps_clip_c=1.5, use_tis=True, tis_clip=1.5, loss_agg_mode="seq_mean_token_sum"),
    *(dict(use_tis=True, tis_mode=mode, tis_clip=1.5, tis_clip_low=0.5, loss_agg_mode=agg)
      for mode, agg in (("token", "token_mean"), ("sequence", "seq_mean_token_mean"), ("geometric", "token_mean"),
                        ("icepop", "seq_mean_token_sum"))),
]


@pytest.mark.parametrize("overrides", INVARIANCE_CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_micro_batches_sum_to_the_full_batch_loss_and_gradient(small_checkpoint, overrides):
    algorithm = AlgorithmConfig(**{"eps_clip": 0.2, "eps_clip_high": 0.28, **overrides})
    results = {}
    for micro in (1, 4):
        trainer = make_trainer(small_checkpoint, micro=micro, lr=1e-3, algorithm=algorithm, clip_grad=0.0)
        batch = with_rollout_log_probs(ppo_batch(trainer))
        results[micro] = run_step_with_max_len(trainer, batch)
    (metrics1, grads1), (metrics4, grads4) = results[1], results[4]
    assert metrics4["train/loss"] != 0.0
    assert all(g.abs().sum() > 0 for g in grads4.values())
    if algorithm.use_tis:
        assert 0.0 < metrics4["train/tis_clipfrac"] < 1.0
    for key, value in metrics4.items():
        assert metrics1[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for name in grads4:
        torch.testing.assert_close(grads1[name], grads4[name], atol=1e-6, rtol=1e-4, msg=name)


def run_step_with_max_len(trainer, batch):
    original = trainer.train_step
    trainer.train_step = lambda b: original(b, max_len=MAX_LEN)
    try:
        return run_step(trainer, batch)
    finally:
        trainer.train_step = original


def test_sequences_without_a_trained_token_do_not_count(small_checkpoint):
    """num_sequences counts sequences with >= 1 trained token: an all-masked row changes nothing."""
    algorithm = AlgorithmConfig(loss_agg_mode="seq_mean_token_sum", eps_clip=0.2)
    trainer = make_trainer(small_checkpoint, micro=8, algorithm=algorithm, lr=0.0)
    batch = ppo_batch(trainer)
    padded = batch.select(slice(0, 8))
    padded.loss_mask[7] = 0.0
    with_hole = trainer.train_step(padded, max_len=MAX_LEN)["train/loss"]
    without = trainer.train_step(batch.select(slice(0, 7)), max_len=MAX_LEN)["train/loss"]
    assert with_hole == pytest.approx(without, rel=1e-6)


# ------------------------------------------------------------------------------------- hand-checked
def one_token_rows(log_ratios: list[float], advantages: list[float]) -> tuple[TrainBatch, torch.Tensor]:
    """Rows of one trained token each, current logprob -1 and old logprob -1 - log_ratio."""
    num = len(log_ratios)
    batch = TrainBatch(
        input_ids=torch.zeros((num, 2), dtype=torch.long), attention_mask=torch.ones((num, 2), dtype=torch.long),
        loss_mask=torch.ones((num, 1)), advantages=torch.tensor(advantages)[:, None],
        rollout_log_probs=torch.zeros((num, 1)), old_log_probs=torch.tensor([[-1.0 - r] for r in log_ratios]))
    return batch, torch.full((num, 1), -1.0, requires_grad=True)


def test_dual_clip_caps_the_loss_of_a_negative_advantage_token():
    # A = -1, ratio 5 (far above 1 + eps): PPO's loss is max(5, 1.2) = 5 with gradient -A*r = 5; dual clip
    # with c = 3 caps it at -A*c = 3, gradient 0. A second token at ratio 2 (loss 2 < 3) is left alone.
    batch, log_probs = one_token_rows([math.log(5.0), math.log(2.0)], [-1.0, -1.0])
    config = AlgorithmConfig(eps_clip=0.2, eps_clip_c=3.0)
    loss, metrics = micro_batch_loss(config, batch, log_probs, None, 2, 2)
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2, rel=1e-6)
    assert metrics["train/dual_clipfrac"] == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.0], [2.0 / 2]]))

    batch, log_probs = one_token_rows([math.log(5.0)], [-1.0])
    plain, _ = micro_batch_loss(AlgorithmConfig(eps_clip=0.2), batch, log_probs, None, 1, 1)
    assert plain.item() == pytest.approx(5.0, rel=1e-6)


def test_tis_weight_multiplies_the_policy_loss():
    # On-policy (ratio 1), A = 1 and 0.5; trainer old logprob - rollout logprob = 0.5 and 1.3:
    # w = e^0.5 = 1.6487 (inside [0, 2]) and e^1.3 = 3.67 -> 2 (clipped).
    batch, log_probs = one_token_rows([0.0, 0.0], [1.0, 0.5])
    batch.rollout_log_probs = torch.tensor([[-1.5], [-2.3]])
    config = AlgorithmConfig(use_tis=True, tis_clip=2.0)
    loss, metrics = micro_batch_loss(config, batch, log_probs, None, 2, 2)
    w = math.exp(0.5)
    assert loss.item() == pytest.approx(-(w * 1.0 + 2.0 * 0.5) / 2, rel=1e-6)
    assert metrics["train/tis_weight_mean"] == pytest.approx((w + 2.0) / 2, rel=1e-6)
    assert metrics["train/tis_clipfrac"] == pytest.approx(0.5)
    assert metrics[ROLLOUT_LOGPROB_ABS_DIFF] == pytest.approx((0.5 + 1.3) / 2, rel=1e-6)
    loss.backward()  # the weight is detached: d/dlogp = -A * w * r / N
    torch.testing.assert_close(log_probs.grad, torch.tensor([[-w / 2], [-1.0 / 2]]))

    batch.old_log_probs = None
    with pytest.raises(ValueError, match="--use-tis"):
        micro_batch_loss(config, batch, log_probs, None, 2, 2)


def k3_by_hand(sampler: float, other: float) -> float:
    """Schulman's k3 of KL(sampler || other) at one token drawn from the sampler: r - 1 - log r, r = p_other / p_sampler."""
    ratio = math.exp(other - sampler)
    return ratio - 1.0 - math.log(ratio)


def test_rollout_policy_kl_and_ref_kl_match_a_hand_computation():
    # Trainer logprobs -1 at both tokens; the engine sampled them at -1.5 and -0.7; the reference has -1.2, -1.0.
    batch, log_probs = one_token_rows([0.0, 0.0], [1.0, -1.0])
    batch.rollout_log_probs = torch.tensor([[-1.5], [-0.7]])
    batch.ref_log_probs = torch.tensor([[-1.2], [-1.0]])
    _, metrics = micro_batch_loss(AlgorithmConfig(), batch, log_probs, None, 2, 2)
    rollout_kl = (k3_by_hand(-1.5, -1.0) + k3_by_hand(-0.7, -1.0)) / 2  # (0.1487 + 0.0408) / 2
    assert metrics[ROLLOUT_POLICY_KL] == pytest.approx(rollout_kl, rel=1e-6)
    assert metrics[REF_KL] == pytest.approx((k3_by_hand(-1.0, -1.2) + k3_by_hand(-1.0, -1.0)) / 2, rel=1e-6)
    assert metrics[REF_KL] > 0 and "train/kl_loss" not in metrics  # logged without a KL term in the loss

    batch.ref_log_probs = None  # no reference model: no reference KL
    assert REF_KL not in micro_batch_loss(AlgorithmConfig(), batch, log_probs, None, 2, 2)[1]


# ------------------------------------------------------------------------------- update_policy wiring
@pytest.mark.parametrize(("overrides", "global_batch", "old", "diff"), [
    ({}, 4, "none", 0.5),  # one on-policy step: no extra pass, the diff of the first training forward
    ({}, 2, "recomputed", 0.1),  # two steps: frozen before the first; the diff from that pass
    (dict(use_tis=True), 4, "recomputed", 0.1),  # TIS needs the trainer's old logprobs
    (dict(use_rollout_logprobs=True), 2, "rollout", 0.5),  # the first step's forward only, not the mean
])
def test_old_log_probs_and_the_mismatch_metric(overrides, global_batch, old, diff):
    trainer = RecordingTrainer()
    metrics = update_policy(trainer, groups_of(REWARDS), AlgorithmConfig(**overrides), REWARDS, global_batch, PAD,
                            max_response_len=7)
    assert metrics[ROLLOUT_LOGPROB_ABS_DIFF] == pytest.approx(diff)
    if old == "recomputed":  # the stand-in's logprobs are the rollout's + 0.1: k3 = e^0.1 - 1 - 0.1
        assert metrics[ROLLOUT_POLICY_KL] == pytest.approx(math.exp(0.1) - 1.1, rel=1e-5)
    assert trainer.num_logprob_passes == (old == "recomputed")
    for batch, max_len in trainer.steps:
        assert max_len == 7
        if old == "none":
            assert batch.old_log_probs is None
        else:
            shift = 0.1 if old == "recomputed" else 0.0
            torch.testing.assert_close(batch.old_log_probs, batch.rollout_log_probs + shift * batch.loss_mask)


def test_normalize_advantages_whitens_over_the_whole_rollout_batch():
    trainer = RecordingTrainer()
    rewards = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    update_policy(trainer, groups_of(rewards), AlgorithmConfig(normalize_advantages=True), rewards, 3, PAD)
    assert len(trainer.steps) == 2  # whitened before the split: each step alone is not zero-mean
    values = torch.cat([b.advantages[b.loss_mask.bool()] for b, _ in trainer.steps])
    assert values.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert values.std().item() == pytest.approx(1.0, abs=1e-4)


class ShiftedTrainer(RecordingTrainer):
    """Old logprobs log(w_row) above the rollout's on trained tokens: token TIS weight w_row."""

    def __init__(self, row_weights):
        super().__init__(step_diffs=(0.0, 0.0))
        self.row_log_weights = torch.tensor(row_weights).log()[:, None]

    def compute_logprobs(self, batch, reference=False):
        return batch.rollout_log_probs + self.row_log_weights * batch.loss_mask


def test_tis_ess_is_over_each_optimizer_step_not_the_rollout():
    # Response lengths 1, 2 | 1, 2 (two steps of two rows): token weights 1, 2, 2 | 1, 4, 4.
    trainer = ShiftedTrainer([1.0, 2.0, 1.0, 4.0])
    metrics = update_policy(trainer, groups_of(REWARDS), AlgorithmConfig(use_tis=True, tis_clip=10.0), REWARDS, 2,
                            PAD)
    per_step = (5**2 / (3 * 9), 9**2 / (3 * 33))
    assert metrics["train/tis_ess"] == pytest.approx(sum(per_step) / 2)
    assert "train/tis_ess" not in update_policy(RecordingTrainer(), groups_of(REWARDS), AlgorithmConfig(), REWARDS,
                                                4, PAD)


@pytest.mark.parametrize("flag", ["use_tis", "use_rollout_logprobs"])
def test_missing_engine_logprobs_fail_naming_the_flag(flag):
    with pytest.raises(ValueError, match="--" + flag.replace("_", "-")):
        update_policy(RecordingTrainer(), groups_of(REWARDS, with_logprobs=False), AlgorithmConfig(**{flag: True}),
                      REWARDS, 4, PAD)


# --------------------------------------------------------------------------- first-step invariants
def fresh_batch(trainer) -> TrainBatch:
    """A batch whose old logprobs are the trainer's own, recomputed as update_policy does before step 1."""
    samples, advantages = random_samples(8, seed=0)
    batch = collate(samples, advantages, PAD)
    batch.old_log_probs = trainer.compute_logprobs(batch)
    return batch


LAYOUTS = {"one-micro-batch": dict(micro=8), "micro-3": dict(micro=3),
           "packed": dict(micro=1, use_dynamic_batch_size=True, max_tokens_per_gpu=20)}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_recomputed_old_log_probs_match_the_first_training_forward(small_checkpoint, layout):
    """At the first step the weights have not moved: ratio exactly 1, so nothing is clipped and ppo_kl is 0.
    The logprob pass runs the training step's micro-batches (same rows, padding or packing), so the two agree
    bitwise. A nonzero value means they compute different things (layout, dropout, dtype)."""
    layout = dict(layout)
    trainer = make_trainer(small_checkpoint, micro=layout.pop("micro"), lr=1e-3,
                           algorithm=AlgorithmConfig(eps_clip=0.2), **layout)
    metrics = trainer.train_step(fresh_batch(trainer), max_len=MAX_LEN)
    assert metrics["train/ppo_kl"] == 0.0
    assert metrics["train/clipfrac"] == 0.0


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_loss_to_the_initial_checkpoint_is_zero_at_the_first_step(small_checkpoint, kl_type):
    algorithm = AlgorithmConfig(eps_clip=0.2, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type=kl_type)
    trainer = make_trainer(small_checkpoint, micro=3, lr=1e-3, algorithm=algorithm)  # reference = same checkpoint
    batch = fresh_batch(trainer)
    batch.ref_log_probs = trainer.compute_logprobs(batch, reference=True)
    metrics = trainer.train_step(batch, max_len=MAX_LEN)
    assert metrics["train/kl_loss"] == 0.0
    assert metrics["train/ppo_kl"] == 0.0


# ------------------------------------------------------------------------------------- a few steps learn
@pytest.mark.parametrize("extra", [
    ["--advantage-estimator", "grpo"],
    ["--advantage-estimator", "dr_grpo"],
    ["--advantage-estimator", "rloo"],
    ["--advantage-estimator", "reinforce_plus_plus_baseline"],
    ["--advantage-estimator", "reinforce_plus_plus_baseline_sample"],
    ["--advantage-estimator", "reinforce_plus_plus", "--kl-coef", "0.01"],
    ["--advantage-estimator", "ppo", "--critic-lr", "1e-2", "--lambd", "0.95"],
    # The KL penalty in the reward of a group estimator, and packed micro-batches by token budget.
    ["--advantage-estimator", "grpo", "--kl-coef", "0.05"],
    ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "64"],
    # One response token: the sequence ratio is the token ratio, so PPO's clip range fits.
    ["--advantage-estimator", "gspo", "--loss-agg-mode", "seq_mean_token_mean"],
    ["--advantage-estimator", "cispo", "--eps-clip", "1.0", "--eps-clip-high", "0.28"],
    # Two optimizer steps per rollout, TIS, whitened advantages, dual clip, Dr.GRPO's aggregation.
    ["--use-tis", "--normalize-advantages", "--global-batch-size", "32", "--eps-clip-c", "3",
     "--loss-agg-mode", "seq_mean_token_sum_norm"],
    # The other off-policy corrections, with two optimizer steps per rollout.
    ["--use-tis", "--tis-mode", "sequence", "--global-batch-size", "32"],
    ["--use-tis", "--tis-mode", "icepop", "--tis-clip-low", "0.5", "--global-batch-size", "32"],
], ids=lambda e: "-".join(a.lstrip("-") for a in e[:3]))
def test_each_estimator_raises_the_reward(say7, extra):
    root, model, data = say7
    run_dir = root / "-".join(extra).replace("--", "")
    run_loop(flags(model, data, run_dir, run_dir / "save", 14, *extra))
    records = read_metrics(run_dir / "metrics.jsonl")
    rewards = [r["rollout/reward_mean"] for r in records if "rollout/reward_mean" in r]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3
    # The in-process engine samples from the same float32 weights: trainer and engine agree closely.
    assert all(r[ROLLOUT_LOGPROB_ABS_DIFF] < 1e-3 for r in records if ROLLOUT_LOGPROB_ABS_DIFF in r)
    if "--use-tis" in extra:  # so the importance weights are all ~1: an effective sample size of ~1
        ess = [r["train/tis_ess"] for r in records if "train/rollout_logprob_abs_diff" in r]
        assert ess and all(value > 0.99 for value in ess)
