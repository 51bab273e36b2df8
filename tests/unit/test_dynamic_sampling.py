"""DAPO dynamic sampling (group filters, rounds, the cap) and the soft overlong punishment."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from sluice.config import ConfigError, parse_config, validate
from sluice.data import PromptSource
from sluice.engine.clients.in_process import InProcessClient
from sluice.rewards.overlong import OverlongShaping, overlong_penalty
from sluice.rollout.dynamic_sampling import load_group_filter, sample_filtered_groups
from sluice.rollout.filters import drop_uniform_rewards
from sluice.rollout.generate import GenerateContext
from sluice.rollout.finish import scalar_rewards
from sluice.rollout.manager import RolloutManager
from sluice.rollout.metrics import rollout_metrics
from sluice.types import Sample, SamplingParams, Status

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

N_SAMPLES = 4


def group(*rewards) -> list[Sample]:
    return [Sample(prompt="p", index=i, reward=r) for i, r in enumerate(rewards)]


# ---- filters ----------------------------------------------------------------------------------------
def test_drop_uniform_rewards_keeps_only_groups_with_a_signal():
    assert drop_uniform_rewards(group(0.0, 1.0, 0.0))
    assert drop_uniform_rewards(group(0.5, 0.5, 0.25))
    assert not drop_uniform_rewards(group(1.0, 1.0, 1.0))
    assert not drop_uniform_rewards(group(0.0, 0.0))
    assert not drop_uniform_rewards(group(0.0, None))  # a failed sample counts as 0.0, as in training
    assert not drop_uniform_rewards(group(1.0))  # a single sample has no spread
    assert drop_uniform_rewards(group({"acc": 1.0}, {"acc": 0.0}))
    assert not drop_uniform_rewards(group({"acc": 1.0}, {"acc": 1.0}))


def test_builtin_filter_loads_by_dotted_path():
    keep = load_group_filter("sluice.rollout.filters.drop_uniform_rewards")
    assert keep(group(0.0, 1.0)) and not keep(group(1.0, 1.0))


def test_slime_style_filter_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_dapo_filters.py").write_text(
        "from types import SimpleNamespace\n"
        "def keep_spread(args, samples):\n"
        "    rewards = [s.reward for s in samples]\n"
        "    return SimpleNamespace(keep=max(rewards) - min(rewards) >= args.min_spread, reason='spread')\n"
        "def keep_bool(args, samples):\n"
        "    return len(samples) == args.n_samples_per_prompt\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = argparse.Namespace(min_spread=0.5, n_samples_per_prompt=2)
    keep = load_group_filter("my_dapo_filters.keep_spread", args)
    assert keep(group(0.0, 1.0)) and not keep(group(0.0, 0.25))
    keep = load_group_filter("my_dapo_filters:keep_bool", args)
    assert keep(group(0.0, 0.0)) and not keep(group(0.0, 0.0, 0.0))


@pytest.mark.parametrize("path", ["no_such_module_xyz.keep", "sluice.rollout.filters.nope", "nodots"])
def test_a_filter_that_does_not_load_is_a_config_error_naming_the_flag(small_checkpoint, tmp_path, path):
    from sluice.orchestration import build_run

    config = parse_config(["--hf-checkpoint", small_checkpoint, "--prompt-data", str(tmp_path / "none.jsonl"),
                           "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rm-type", "exact",
                           "--label-key", "label",
                           "--dynamic-sampling-filter-path", path, "--run-dir", str(tmp_path / "run")])
    validate(config)
    with pytest.raises(ConfigError, match="--dynamic-sampling-filter-path"):
        build_run(config, log=lambda line: None)


# ---- config -----------------------------------------------------------------------------------------
BASE = ["--hf-checkpoint", "m", "--prompt-data", "d.jsonl", "--rollout-batch-size", "4", "--rm-type", "exact",
        "--label-key", "label", "--rollout-max-response-len", "16", "--n-samples-per-prompt", "2"]


@pytest.mark.parametrize("extra, flag", [
    (["--over-sampling-batch-size", "0"], "--over-sampling-batch-size"),
    (["--overlong-buffer-len", "0"], "--overlong-buffer-len"),
    (["--overlong-buffer-len", "16"], "--overlong-buffer-len"),
    (["--overlong-buffer-len", "4", "--overlong-penalty-factor", "-1"], "--overlong-penalty-factor"),
])
def test_config_errors_name_their_flag(extra, flag):
    with pytest.raises(ConfigError, match=flag):
        validate(parse_config(BASE + extra))


def test_valid_dynamic_sampling_and_overlong_flags_pass():
    config = parse_config(BASE + ["--over-sampling-batch-size", "6", "--dynamic-sampling-filter-path",
                                  "sluice.rollout.filters.drop_uniform_rewards", "--overlong-buffer-len", "4"])
    validate(config)
    assert config.rollout.dynamic_sampling and config.reward.overlong_penalty_factor == 1.0
    assert not parse_config(BASE).rollout.dynamic_sampling


# ---- overlong penalty -------------------------------------------------------------------------------
@pytest.mark.parametrize("n, expected", [(1, 0.0), (5, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (10, -1.0)])
def test_overlong_penalty_hand_values(n, expected):
    # M = 10, L = 4: the buffer starts at M - L = 6; the penalty reaches -P at n = M
    assert overlong_penalty(n, 10, 4, 1.0) == pytest.approx(expected)
    assert overlong_penalty(n, 10, 4, 0.5) == pytest.approx(expected / 2)


def test_overlong_shaping_adds_to_float_rewards_only():
    samples = [Sample(prompt="p", reward=1.0, response_length=10), Sample(prompt="p", reward=1, response_length=6),
               Sample(prompt="p", reward={"acc": 1.0}, response_length=10),
               Sample(prompt="p", reward=None, response_length=10, status=Status.FAILED)]
    OverlongShaping(max_response_len=10, buffer_len=4, penalty_factor=0.5).apply(samples)
    assert [s.reward for s in samples] == [0.5, 1.0, {"acc": 1.0}, None]
    assert [s.metadata.get("overlong_penalty") for s in samples] == [-0.5, 0.0, None, None]


# ---- with the real engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ctx(small_checkpoint):
    from sluice.config import EngineConfig
    from sluice.engine.local_engine import LocalEngine

    engine = LocalEngine(small_checkpoint, EngineConfig(device="cpu", dtype="float32"))
    yield GenerateContext(InProcessClient(engine), engine.tokenizer)
    engine.shutdown()


async def prompt_dependent_reward(sample: Sample) -> float:
    """Uniform (1.0) for 'same' prompts; alternating 0/1 across a group for 'vary' prompts."""
    return 1.0 if sample.prompt.startswith("same") else float(sample.index % 2)


def prompts(tokenizer, names: list[str]) -> list[Sample]:
    return [Sample(prompt=n, prompt_tokens=tokenizer.encode(n, add_special_tokens=False)) for n in names]


def sample_rounds(ctx, names, target, over, group_filter, max_rounds=8, first_index=0):
    source = PromptSource(prompts(ctx.tokenizer, names), shuffle=False, seed=0)
    manager = RolloutManager(ctx, prompt_dependent_reward)
    outcome = asyncio.run(sample_filtered_groups(
        manager, source, target, over, N_SAMPLES, SamplingParams(max_new_tokens=3), group_filter,
        first_index=first_index, max_rounds=max_rounds))
    return outcome, source


def test_dynamic_sampling_keeps_passing_groups_and_counts_rounds(small_ctx):
    names = [f"{kind} {i}" for i in range(6) for kind in ("same", "vary")]  # same 0, vary 0, same 1, ...
    outcome, source = sample_rounds(small_ctx, names, target=3, over=4, group_filter=drop_uniform_rewards,
                                    first_index=100)
    # round 1: vary 0, vary 1 pass; round 2: whichever of vary 2, vary 3 finishes first fills the batch, and the
    # rest of the round is abandoned (cancelled where still running)
    assert outcome.num_generation_rounds == 2 and source.num_consumed == 8
    kept = [g.samples[0].prompt for g in outcome.groups]
    assert kept[:2] == ["vary 0", "vary 1"] and kept[2] in ("vary 2", "vary 3")
    assert all(drop_uniform_rewards(g.samples) for g in outcome.groups)
    assert [[s.group_index for s in g.samples] for g in outcome.groups] == [[i] * N_SAMPLES for i in range(3)]
    assert [s.index for g in outcome.groups for s in g.samples] == list(range(100, 100 + 3 * N_SAMPLES))
    assert outcome.num_passed_groups == 3
    assert outcome.num_generated_groups + outcome.num_cancelled_groups == 8
    metrics = outcome.metrics()
    assert metrics["rollout/num_generation_rounds"] == 2.0 and metrics["rollout/num_kept_groups"] == 3.0
    assert metrics["rollout/filtered_groups_frac"] == pytest.approx(
        (outcome.num_generated_groups - 3) / outcome.num_generated_groups)


def test_dynamic_sampling_stops_at_the_round_cap(small_ctx):
    names = ["same a", "same b", "vary c", "same d", "same e", "same f"]
    outcome, source = sample_rounds(small_ctx, names, target=3, over=2, group_filter=drop_uniform_rewards,
                                    max_rounds=3)
    assert outcome.num_generation_rounds == 3 and source.num_consumed == 6
    assert [g.samples[0].prompt for g in outcome.groups] == ["vary c"]  # short: trained as it is
    assert outcome.metrics()["rollout/num_kept_groups"] == 1.0
    assert outcome.metrics()["rollout/filtered_groups_frac"] == pytest.approx(5 / 6)
    # nothing passes: the last round's groups are trained on, and num_kept_groups says 0 passed
    outcome, _ = sample_rounds(small_ctx, ["same x", "same y"], target=2, over=2,
                               group_filter=drop_uniform_rewards, max_rounds=2)
    assert outcome.num_generation_rounds == 2 and len(outcome.groups) == 2
    assert outcome.metrics()["rollout/num_kept_groups"] == 0.0


def test_without_a_filter_over_sampling_keeps_the_first_groups(small_ctx):
    outcome, source = sample_rounds(small_ctx, ["same a", "vary b", "same c"], target=2, over=3,
                                    group_filter=None)
    assert outcome.num_generation_rounds == 1 and source.num_consumed == 3
    assert [g.samples[0].prompt for g in outcome.groups] == ["same a", "vary b"]


def test_manager_applies_overlong_penalty_to_training_rollouts_not_eval(small_ctx):
    async def one(sample: Sample) -> float:
        return 1.0

    shaping = OverlongShaping(max_response_len=4, buffer_len=2, penalty_factor=1.0)
    manager = RolloutManager(small_ctx, one, overlong=shaping)
    batch = prompts(small_ctx.tokenizer, ["hello", "abc"])
    groups = asyncio.run(manager.generate_groups(batch, 3, SamplingParams(max_new_tokens=4)))
    samples = [s for g in groups for s in g.samples]
    for s in samples:
        assert s.reward == pytest.approx(1.0 + overlong_penalty(s.response_length, 4, 2, 1.0))
    expected = sum(overlong_penalty(s.response_length, 4, 2, 1.0) for s in samples) / len(samples)
    metrics = rollout_metrics(groups, scalar_rewards(groups, manager), overlong_shaped=True)
    assert metrics["rollout/overlong_penalty_mean"] == pytest.approx(expected)
    assert any(s.response_length > 2 for s in samples)  # the penalty was exercised
    groups = asyncio.run(manager.generate_groups(batch, 3, SamplingParams(max_new_tokens=4), shape_rewards=False))
    assert all(s.reward == 1.0 for g in groups for s in g.samples)
