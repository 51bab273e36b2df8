"""--loss-type custom_loss: loading by dotted path, colon path and file path; the signature check and its errors;
the LossInputs contract (hand values, micro-batch invariance through ``reduce``); a few steps from flags."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from sluice.algorithms import ppo_clip
from sluice.config import AlgorithmConfig, ConfigError, parse_config, validate
from sluice.trainer.custom_loss import LossInputs, call_custom_loss, load_custom_loss
from sluice.trainer.loss import micro_batch_loss
from helpers.hand_loss import NUM_TOKENS, PG_A, PG_B, PG_C, PG_D, hand_batch

# The engine passes `past_key_values`, which newer transformers rename (see test_train_loop).
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

PLUGIN = textwrap.dedent('''
    import torch
    from sluice.algorithms import ppo_clip

    def reinforce(inputs):
        """-A * logp: plain REINFORCE, with the mean advantage as a metric."""
        per_token = -inputs.batch.advantages * inputs.log_probs
        return inputs.reduce(per_token), {"adv": inputs.reduce(inputs.batch.advantages)}  # a 0-d tensor

    def clipped(inputs):
        per_token, _ = ppo_clip(inputs.log_probs, inputs.batch.old_log_probs, inputs.batch.advantages, 0.2, 0.28)
        return inputs.reduce(per_token), {"calls": 1}  # a plain number

    def no_args():
        return None

    def slime_style(args, batch, logits, reducer):
        return None

    def two(inputs, extra):
        return None

    def keyword_only(inputs, *, scale):
        return None

    async def asynchronous(inputs):
        return None

    def with_default(inputs, scale=1.0):
        return inputs.reduce(-inputs.log_probs * scale), {}

    class Holder:
        @staticmethod
        def loss(inputs):
            return inputs.reduce(-inputs.log_probs), {}

    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plug-in module, importable as ``my_losses`` and present as a file; returns the file path."""
    path = tmp_path / "my_losses.py"
    path.write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


@pytest.mark.parametrize("form", ["my_losses.reinforce", "my_losses:reinforce", "FILE:reinforce",
                                  "my_losses:Holder.loss", "my_losses.with_default"])
def test_every_path_form_loads(plugin, form):
    fn = load_custom_loss(form.replace("FILE", str(plugin)))
    assert callable(fn)


@pytest.mark.parametrize(("target", "message"), [
    ("my_losses.no_args", r"takes \(\); expected sluice's fn\(inputs: LossInputs\)"),
    ("my_losses.two", r"takes \(inputs, extra\)"),
    ("my_losses.slime_style", "slime's"),
    ("my_losses.keyword_only", "required keyword-only parameters"),
    ("my_losses.asynchronous", "synchronous"),
    ("my_losses.NOT_A_FUNCTION", "not a function"),
    ("my_losses.missing", "has no attribute 'missing'"),
    ("no_such_module_xyz.fn", "cannot import 'no_such_module_xyz'"),
    ("FILE", "name the function too"),
    ("/no/such/dir/losses.py:fn", "no such file"),
    ("reinforce", "must look like"),
])
def test_bad_functions_fail_at_load_naming_the_flag(plugin, target, message):
    with pytest.raises((TypeError, ImportError, ValueError), match=message) as err:
        load_custom_loss(target.replace("FILE", str(plugin)))
    assert "--custom-loss-function-path" in str(err.value)


def test_a_bad_function_is_a_config_error_before_any_model_loads(plugin, small_checkpoint):
    from sluice.orchestration import build_run

    config = parse_config(["--hf-checkpoint", small_checkpoint, "--rm-type", "exact", "--loss-type", "custom_loss",
                           "--custom-loss-function-path", "my_losses.two", "--prompt-data", "never-read.jsonl"])
    with pytest.raises(ConfigError, match="--custom-loss-function-path"):
        build_run(config, log=lambda line: None)


# ------------------------------------------------------------------------------------------ the contract
def test_custom_loss_reproduces_the_built_in_policy_loss(plugin):
    """test_trainer's hand batch: the same PPO clip loss and gradient through LossInputs."""
    config = AlgorithmConfig(loss_type="custom_loss")
    batch, log_probs = hand_batch()
    loss, metrics = micro_batch_loss(config, batch, log_probs, None, NUM_TOKENS, 2,
                                     custom_loss=load_custom_loss("my_losses.clipped"))
    assert loss.item() == pytest.approx((PG_A + PG_B + PG_C + PG_D) / NUM_TOKENS, abs=1e-6)
    assert float(metrics["train/loss"]) == pytest.approx(loss.item())
    assert metrics["train/calls"] == 1.0 and isinstance(metrics["train/calls"], float)
    loss.backward()
    expected_grad = [[0.0, -math.exp(0.1) / 4, 0.0], [0.0, 0.5 / 4, 0.0]]
    torch.testing.assert_close(log_probs.grad, torch.tensor(expected_grad), atol=1e-6, rtol=0)


def test_reduce_makes_micro_batches_add_up_and_kl_and_entropy_terms_are_added(plugin):
    # REINFORCE on the hand batch: trained tokens (logp, A): (-1, 1), (-0.6, 1), (-1.3, -0.5), (-0.7, -0.5).
    config = AlgorithmConfig(loss_type="custom_loss", use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01)
    batch, log_probs = hand_batch(with_ref=True)
    entropy = torch.tensor([[9.0, 2.0, 1.5], [1.0, 0.5, 9.0]])
    fn = load_custom_loss("my_losses.reinforce")
    full, metrics = micro_batch_loss(config, batch, log_probs, entropy, NUM_TOKENS, 2, custom_loss=fn)
    pg = (1.0 + 0.6 - 0.5 * 1.3 - 0.5 * 0.7) / 4
    kl = (0.2 - 0.1 - 0.3 + 0.3) / 4  # k1 = logp - ref on the trained tokens
    ent = (2.0 + 1.5 + 1.0 + 0.5) / 4
    assert full.item() == pytest.approx(pg + 0.1 * kl - 0.01 * ent, abs=1e-6)
    assert float(metrics["train/adv"]) == pytest.approx((1 + 1 - 0.5 - 0.5) / 4)
    halves = [micro_batch_loss(config, batch.select(slice(i, i + 1)), log_probs[i : i + 1], entropy[i : i + 1],
                               NUM_TOKENS, 2, custom_loss=fn)[0].item() for i in range(2)]
    assert sum(halves) == pytest.approx(full.item(), abs=1e-6)


@pytest.mark.parametrize(("result", "message"), [
    (torch.ones(3), r"\(loss, metrics\)"),
    ((torch.ones(3), {}), "0-d tensor"),
    ((1.0, {}), "0-d tensor"),
    ((torch.tensor(1.0), {"x": "high"}), "dict of str -> float"),
    ((torch.tensor(1.0), {"x": True}), "dict of str -> float"),
    ((torch.tensor(1.0), {"x": torch.ones(2)}), "dict of str -> float"),
    ((torch.tensor(1.0), {"x": torch.tensor(True)}), "dict of str -> float"),
])
def test_bad_return_values_are_explained(result, message):
    batch, log_probs = hand_batch()
    inputs = LossInputs(log_probs, None, batch, lambda x: x.sum())
    with pytest.raises(TypeError, match=message):
        call_custom_loss(lambda _: result, inputs)


def test_missing_function_at_train_time_is_an_error():
    batch, log_probs = hand_batch()
    with pytest.raises(ValueError, match="custom-loss-function-path"):
        micro_batch_loss(AlgorithmConfig(loss_type="custom_loss"), batch, log_probs, None, NUM_TOKENS, 2)


# ------------------------------------------------------------------------------------------- from flags


def test_a_custom_reinforce_loss_raises_the_reward_from_flags(plugin, tmp_path):
    from sluice.demo.model import build_checkpoint
    from sluice.observability.metrics import read_metrics
    from helpers.train_loop import SHAPE, flags, run_loop

    data = tmp_path / "say7.jsonl"
    data.write_text("".join(f'{{"input": "{c}: say 7", "label": "7"}}\n' for c in "abcdefghijkl"))
    model = build_checkpoint(tmp_path / "model", shape=SHAPE, seed=0)
    argv = flags(model, data, tmp_path / "run", tmp_path / "save", 10, "--loss-type", "custom_loss",
                 "--custom-loss-function-path", f"{plugin}:reinforce")
    validate(parse_config(argv))
    run_loop(argv)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rollout/reward_mean" in r]
    rewards = [r["rollout/reward_mean"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3
    assert all("train/adv" in r for r in records)
