"""PPO's critic and the token-level estimators: the value model on a tiny checkpoint (zero head, packed = padded,
its loss falls), the wiring of GAE, REINFORCE++ and the --kl-coef reward penalty into update_policy (hand values
with a stub trainer), critic-only steps, and the critic in checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from sluice.algorithms import whiten
from sluice.config import AlgorithmConfig, TrainConfig
from sluice.trainer.batching import collate
from sluice.trainer.critic import Critic, ValueBatch
from sluice.trainer.update import update_policy
from helpers.stub_trainer import REWARDS, RecordingTrainer, groups_of
from helpers.train_loop import flags, run_loop
from helpers.trainer import PAD, make_trainer, random_samples

# The engine passes `past_key_values`, which newer transformers rename (see test_train_loop).
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

PPO = AlgorithmConfig(advantage_estimator="ppo")


def critic_for(path: str, **train_kwargs) -> Critic:
    train_kwargs.setdefault("use_dynamic_batch_size", False)
    train = TrainConfig(train_device="cpu", seed=0, micro_batch_size=3, **train_kwargs)
    return Critic(path, train, PPO, torch.device("cpu"))


def value_batch(critic: Critic, seed: int = 0) -> ValueBatch:
    """8 rows of different lengths; target: +1 on every trained token of even rows, -1 on odd rows."""
    samples, _ = random_samples(8, seed=seed)
    batch = collate(samples, [0.0] * 8, PAD)
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(8)])[:, None]
    returns = signs * batch.loss_mask
    return ValueBatch(batch.input_ids, batch.attention_mask, batch.loss_mask, critic.compute_values(batch), returns)


def test_a_new_value_head_starts_at_zero(small_checkpoint):
    critic = critic_for(small_checkpoint)
    batch = value_batch(critic)
    assert torch.equal(batch.old_values, torch.zeros_like(batch.old_values))
    assert critic.model.dropout.p == 0.0  # deterministic values: the clip anchor must match the training forward


def test_the_critic_value_loss_falls_over_a_few_steps(small_checkpoint):
    critic = critic_for(small_checkpoint, critic_lr=1e-2, lr=0.0)
    batch = value_batch(critic)
    losses = []
    for _ in range(4):
        batch.old_values = critic.compute_values(batch)  # each step anchors the clip at the current values
        metrics = critic.train_step(batch)
        losses.append(metrics["train/value_loss"])
    assert losses[0] == pytest.approx(0.5, rel=1e-6)  # values 0, targets +-1: 0.5 * 1 per token
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.1 * losses[0]
    assert critic.scheduler.get_last_lr()[0] == 1e-2  # --critic-lr, not --lr


def test_packed_critic_values_and_gradients_match_padded(small_checkpoint):
    padded = critic_for(small_checkpoint, critic_lr=1e-2)
    packed = critic_for(small_checkpoint, critic_lr=1e-2, use_dynamic_batch_size=True, max_tokens_per_gpu=24)
    for critic in (padded, packed):  # move the zero head so that values are not trivially 0
        critic.train_step(value_batch(critic))
    batch = value_batch(padded)
    real = batch.attention_mask[:, 1:].bool()
    torch.testing.assert_close(packed.compute_values(batch)[real], batch.old_values[real], atol=1e-6, rtol=1e-5)
    grads = {}
    for name, critic in (("padded", padded), ("packed", packed)):
        critic.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, name=name, critic=critic: grads.__setitem__(
                name, [p.grad.clone() for p in critic.model.parameters()]))
        critic.train_step(batch)
    for a, b in zip(grads["padded"], grads["packed"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------- update_policy, hand values
class ScoringTrainer(RecordingTrainer):
    """Stub: current logprobs 0.1 above the rollout's, reference 0.2 below (k1 = 0.3 per trained token),
    critic values 0.25 everywhere; records what the critic steps received."""

    needs_ref = True

    def __init__(self):
        super().__init__(step_diffs=(0.0, 0.0))
        self.critic_steps: list[ValueBatch] = []

    def compute_logprobs(self, batch, reference=False):
        shift = -0.2 if reference else 0.1
        return batch.rollout_log_probs + shift * batch.loss_mask

    def compute_values(self, batch):
        return torch.full(batch.loss_mask.shape, 0.25)

    def train_critic_step(self, batch, max_len=None):
        self.critic_steps.append(batch)
        return {"train/value_loss": 0.5}


# groups_of(REWARDS): rows of 1, 2, 1, 2 response tokens with rewards 1, 0 | 0, 0.
def trained(batch_advantages, batch) -> list[list[float]]:
    return [row[mask.bool()].tolist() for row, mask in zip(batch_advantages, batch.loss_mask)]


def test_kl_coef_with_grpo_penalises_each_reward_by_its_response_kl():
    # Response KL = 0.3 * length; kl_coef 0.5 -> rewards 1 - 0.15, 0 - 0.3 | 0 - 0.15, 0 - 0.3. Both groups now
    # differ by their KL; each pair of distinct values gets +-1/sqrt(2) under GRPO's (n-1) std.
    trainer = ScoringTrainer()
    metrics = update_policy(trainer, groups_of(REWARDS), AlgorithmConfig(kl_coef=0.5), REWARDS, 4, PAD)
    (batch, _), = trainer.steps
    a = 1 / math.sqrt(2)
    for got, want in zip(trained(batch.advantages, batch), [[a], [-a, -a], [a], [-a, -a]]):
        assert got == pytest.approx(want, rel=1e-4)
    assert metrics["train/reward_kl"] == pytest.approx(0.3)
    assert batch.old_log_probs is None  # the KL pass does not change the on-policy ratio


def test_disable_rewards_normalization_trains_on_the_shaped_rewards_themselves():
    trainer = ScoringTrainer()
    algorithm = AlgorithmConfig(kl_coef=0.5, disable_rewards_normalization=True)
    update_policy(trainer, groups_of(REWARDS), algorithm, REWARDS, 4, PAD)
    (batch, _), = trainer.steps
    expected = [[0.85], [-0.3, -0.3], [-0.15], [-0.3, -0.3]]
    for got, want in zip(trained(batch.advantages, batch), expected):
        assert got == pytest.approx(want, rel=1e-5)


def test_reinforce_plus_plus_token_rewards_returns_and_whitening():
    # Token rewards -0.15 per token (kl_coef 0.5 * 0.3), + reward on the last: returns (gamma 1) per row:
    # [0.85] | [-0.3, -0.15] | [-0.15] | [-0.3, -0.15], then whitened over the 6 tokens.
    trainer = ScoringTrainer()
    algorithm = AlgorithmConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.5)
    update_policy(trainer, groups_of(REWARDS), algorithm, REWARDS, 4, PAD)
    (batch, _), = trainer.steps
    returns = [0.85, -0.3, -0.15, -0.15, -0.3, -0.15]
    mean = sum(returns) / 6
    std = math.sqrt(sum((g - mean) ** 2 for g in returns) / 5)
    expected = [(g - mean) / (std + 1e-6) for g in returns]
    got = [v for row in trained(batch.advantages, batch) for v in row]
    assert got == pytest.approx(expected, rel=1e-4)
    assert trainer.critic_steps == []


def test_ppo_advantages_are_gae_over_the_critic_values_and_the_critic_trains_on_the_returns():
    # gamma = lambda = 1, V = 0.25: A_t = (reward-to-go) - V_t; returns = reward-to-go.
    trainer = ScoringTrainer()
    metrics = update_policy(trainer, groups_of(REWARDS), PPO, REWARDS, 2, PAD)
    advantages = [v for batch, _ in trainer.steps for v in sum(trained(batch.advantages, batch), [])]
    assert advantages == pytest.approx([0.75, -0.25, -0.25, -0.25, -0.25, -0.25])
    assert len(trainer.critic_steps) == 2  # one critic step per optimizer step, on the same rows
    returns = [v for b in trainer.critic_steps for v in sum(trained(b.returns, b), [])]
    assert returns == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert all(torch.all(b.old_values[b.loss_mask.bool()] == 0.25) for b in trainer.critic_steps)
    # Var(R - V) = Var(R): V is constant, so it explains nothing
    assert metrics["train/explained_variance"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["train/value_loss"] == pytest.approx(0.5)


def test_critic_only_steps_leave_the_policy_alone():
    trainer = ScoringTrainer()
    metrics = update_policy(trainer, groups_of(REWARDS), PPO, REWARDS, 2, PAD, train_actor=False)
    assert trainer.steps == [] and len(trainer.critic_steps) == 2
    assert metrics["train/critic_only"] == 1.0 and "train/loss" not in metrics


def test_normalize_advantages_whitens_gae_advantages():
    trainer = ScoringTrainer()
    update_policy(trainer, groups_of(REWARDS), AlgorithmConfig(advantage_estimator="ppo", normalize_advantages=True),
                  REWARDS, 4, PAD)
    (batch, _), = trainer.steps
    raw = torch.tensor([0.75, -0.25, -0.25, -0.25, -0.25, -0.25])  # the GAE advantages above, in row order
    expected = whiten(raw, torch.ones(6)).tolist()
    assert sum(trained(batch.advantages, batch), []) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------ checkpoints
def test_the_critic_is_saved_and_restored_with_the_trainer(small_checkpoint, tmp_path):
    trainer = make_trainer(small_checkpoint, micro=4, algorithm=PPO, critic_lr=1e-2)
    batch = value_batch(trainer.critic)
    trainer.train_critic_step(batch)
    torch.save(trainer.state_dict(), tmp_path / "state.pt")
    saved = {n: p.detach().clone() for n, p in trainer.critic.model.named_parameters()}
    trainer.train_critic_step(batch)  # moves on after the save

    restored = make_trainer(small_checkpoint, micro=4, algorithm=PPO, critic_lr=1e-2)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    for name, param in restored.critic.model.named_parameters():
        assert torch.equal(param, saved[name]), name
    assert {float(s["step"]) for s in restored.critic.optimizer.state.values()} == {1.0}

    plain = make_trainer(small_checkpoint, micro=4)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no critic"):
        restored.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=False))


# ---------------------------------------------------------------------------------- from `sluice train` flags


def test_ppo_runs_from_flags_with_critic_only_steps_and_resumes_with_its_critic(say7):
    from safetensors.torch import load_file

    from sluice.config import parse_config, validate
    from sluice.observability.metrics import read_metrics
    from sluice.orchestration import build_run

    root, model, data = say7
    run_dir, save = root / "ppo", root / "ppo_save"
    ppo_flags = ("--advantage-estimator", "ppo", "--num-critic-only-steps", "2", "--critic-lr", "1e-2",
                 "--gamma", "1.0", "--lambd", "0.95", "--value-clip", "0.5", "--save-interval", "1")
    run_loop(flags(model, data, run_dir, save, 3, *ppo_flags))
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert [r.get("train/critic_only", 0.0) for r in records] == [1.0, 1.0, 0.0]
    assert ["train/loss" in r for r in records] == [False, False, True]
    for record in records:
        assert {"train/value_loss", "train/value_clipfrac", "train/explained_variance"} <= set(record)
    # Two critic-only rollouts leave the policy exactly as it was; the third moves it.
    initial = load_file(model / "model.safetensors")
    after_two = load_file(save / "rollout_000001" / "hf" / "model.safetensors")
    after_three = load_file(save / "rollout_000002" / "hf" / "model.safetensors")
    assert all(torch.equal(initial[name], after_two[name]) for name in initial)
    assert not all(torch.equal(initial[name], after_three[name]) for name in initial)

    saved_critic = torch.load(save / "rollout_000002" / "trainer.pt", weights_only=False)["critic"]["model"]
    config = parse_config(flags(model, data, root / "ppo_resumed", root / "ppo_save2", 4, *ppo_flags,
                                "--load", str(save)))
    validate(config)
    run = build_run(config, log=lambda line: None)
    try:
        for name, param in run.trainer.backend.critic.model.state_dict().items():
            assert torch.equal(param, saved_critic[name]), name
    finally:
        run.close()


def test_the_critic_keeps_float32_masters_and_moments_under_bf16_compute(small_checkpoint):
    """--train-dtype bfloat16: values and gradients in bf16 under autocast, the weights AdamW steps float32."""
    float32, bf16 = critic_for(small_checkpoint, critic_lr=1e-2), critic_for(small_checkpoint, critic_lr=1e-2,
                                                                            train_dtype="bfloat16")
    batch = value_batch(float32)
    float32.train_step(batch)
    bf16.train_step(batch)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    moments = [s["exp_avg"] for s in bf16.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    gap = (bf16.compute_values(batch) - float32.compute_values(batch))[batch.attention_mask[:, 1:].bool()].abs()
    assert 0 < gap.max() < 0.05  # bf16 rounding of the same step, nothing worse


def test_an_offloaded_critic_takes_the_device_critics_steps(small_checkpoint, tmp_path):
    """--optimizer-cpu-offload moves the critic's masters and moments to the host too: bitwise the steps of the
    device critic on the same (fused) kernel; its checkpoint holds the float32 masters and resumes on the device."""
    device = critic_for(small_checkpoint, critic_lr=1e-2)
    for group in device.optimizer.param_groups:
        group["foreach"], group["fused"] = False, True
    offloaded = critic_for(small_checkpoint, critic_lr=1e-2, optimizer_cpu_offload=True)
    assert offloaded.optimized.host is not None
    batch = value_batch(device)
    assert [offloaded.train_step(batch) for _ in range(2)] == [device.train_step(batch) for _ in range(2)]
    assert torch.equal(offloaded.compute_values(batch), device.compute_values(batch))
    torch.save(offloaded.state_dict(), tmp_path / "critic.pt")
    resumed = critic_for(small_checkpoint, critic_lr=1e-2)
    resumed.load_state_dict(torch.load(tmp_path / "critic.pt", weights_only=False))
    for group in resumed.optimizer.param_groups:
        group["foreach"], group["fused"] = False, True
    assert resumed.train_step(batch) == offloaded.train_step(batch)


def test_a_critic_checkpoint_with_bf16_weights_and_moments_resumes_in_float32(small_checkpoint):
    """Critics saved before they kept float32 masters hold bf16 weights and moments: they load, as float32."""
    saver = critic_for(small_checkpoint, critic_lr=1e-2)
    batch = value_batch(saver)
    saver.train_step(batch)
    state = saver.state_dict()
    as_bf16 = lambda t: t.to(torch.bfloat16) if t.is_floating_point() and t.dim() > 0 else t  # noqa: E731
    state["model"] = {name: as_bf16(t) for name, t in state["model"].items()}
    for moments in state["optimizer"]["state"].values():
        moments.update({key: as_bf16(t) for key, t in moments.items()})
    resumed = critic_for(small_checkpoint, critic_lr=1e-2)
    resumed.load_state_dict(state)
    assert all(p.dtype == torch.float32 for p in resumed.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in resumed.optimizer.state.values())
    for (name, param), (_, saved) in zip(resumed.model.named_parameters(), saver.model.named_parameters()):
        assert torch.equal(param, saved.to(torch.bfloat16).float()), name
    metrics = resumed.train_step(batch)
    assert math.isfinite(metrics["train/value_loss"]) and metrics["train/critic_grad_norm"] > 0
