"""Bad flags fail before any model loads, with a message that names the flag(s) and what is wrong."""

from __future__ import annotations

import pytest
import torch

from sluice.config import ConfigError, parse_config, validate

# A minimal training run that passes validation; each test breaks one thing.
VALID_TRAINING = [
    "--hf-checkpoint", "models/tiny", "--prompt-data", "data/train.jsonl",
    "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--rm-type", "math", "--label-key", "answer",
]


def problems_of(*flags: str) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(parse_config([*VALID_TRAINING, *flags]))
    return str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("flag", ["--train-device", "--sglang-device"])
def test_cuda_device_without_cuda_names_flag(flag: str) -> None:
    assert f"{flag} cuda: this machine has no CUDA device" in problems_of(flag, "cuda")
    assert f"{flag} cuda:1: this machine has no CUDA device" in problems_of(flag, "cuda:1")


@pytest.mark.parametrize("flag", ["--train-device", "--sglang-device"])
def test_unknown_device_names_flag(flag: str) -> None:
    assert f"{flag} 'gpu0' is not a device: use auto, cpu or cuda[:N]" in problems_of(flag, "gpu0")


def test_cpu_and_auto_devices_pass() -> None:
    validate(parse_config([*VALID_TRAINING, "--train-device", "cpu", "--sglang-device", "auto"]))


def test_distributed_run_leaves_devices_to_its_actors() -> None:
    validate(parse_config([*VALID_TRAINING, "--orchestrator", "ray", "--train-device", "cuda"]))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "gspo", "cispo", "reinforce_plus_plus_baseline",
                                       "reinforce_plus_plus_baseline_sample"])
def test_group_estimator_with_one_sample_names_both_flags(estimator: str) -> None:
    message = problems_of("--advantage-estimator", estimator, "--n-samples-per-prompt", "1")
    assert f"--advantage-estimator {estimator} with --n-samples-per-prompt 1" in message
    assert "advantage 0" in message and "no gradient" in message


def test_kl_coef_with_one_sample_per_prompt_is_named_for_what_it_does_to_each_estimator() -> None:
    # a sample-level group estimator: the KL-shaped reward of a group of one is still centred to 0
    grpo = problems_of("--kl-coef", "0.1", "--n-samples-per-prompt", "1")
    assert ("--kl-coef has no effect with --advantage-estimator grpo and --n-samples-per-prompt 1: a group of one "
            "sample always has advantage 0") in grpo
    # the token form: -kl_coef * KL_t is on every token, whitened; only the reward's part is 0
    token = problems_of("--advantage-estimator", "reinforce_plus_plus_baseline", "--kl-coef", "0.1",
                        "--n-samples-per-prompt", "1")
    assert "--kl-coef has no effect" not in token and "always has advantage 0" not in token
    assert ("--advantage-estimator reinforce_plus_plus_baseline with --n-samples-per-prompt 1: a reward minus the mean "
            "of its group of one is 0, so only the --kl-coef penalty trains the policy and the reward never does") in token
    validate(parse_config([*VALID_TRAINING, "--advantage-estimator", "reinforce_plus_plus_baseline", "--kl-coef", "0.1",
                           "--n-samples-per-prompt", "1", "--disable-rewards-normalization"]))


@pytest.mark.parametrize("flags", [
    ["--advantage-estimator", "reinforce_plus_plus"],
    ["--advantage-estimator", "grpo", "--disable-rewards-normalization"],  # plain REINFORCE on the raw reward
    ["--loss-type", "sft_loss"],
])
def test_one_sample_per_prompt_where_it_learns(flags: list[str]) -> None:
    validate(parse_config([*VALID_TRAINING, "--n-samples-per-prompt", "1", *flags]))


def test_one_sample_per_prompt_outside_training() -> None:
    validate(parse_config(["--n-samples-per-prompt", "1"]), for_training=False)  # eval and serve compute no advantage


@pytest.mark.parametrize("estimator", ["rloo", "dr_grpo", "reinforce_plus_plus_baseline", "ppo"])
def test_grpo_std_switch_without_a_grpo_std_is_refused(estimator: str) -> None:
    message = problems_of("--advantage-estimator", estimator, "--disable-grpo-std-normalization")
    assert f"--disable-grpo-std-normalization has no effect with --advantage-estimator {estimator}" in message


def test_the_context_comes_from_the_flag_or_the_checkpoint_even_of_an_unknown_family(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from sluice.orchestration.context_budget import read_context

    flags = ["--prompt-data", "p.jsonl", "--rollout-batch-size", "1", "--rm-type", "exact"]
    odd = tmp_path / "odd"
    shutil.copytree(tiny_checkpoint, odd)
    config_json = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config_json, "model_type": "no_such_family",
                                                 "max_position_embeddings": 99}))
    context = read_context(parse_config(["--hf-checkpoint", str(odd), *flags]), str(odd))
    assert (context.num_tokens, context.source) == (99, f"max_position_embeddings in {odd / 'config.json'}")
    known = read_context(parse_config(["--hf-checkpoint", tiny_checkpoint, *flags]), tiny_checkpoint)
    assert known.num_tokens == config_json["max_position_embeddings"]
    flagged = read_context(parse_config(["--hf-checkpoint", tiny_checkpoint, "--sglang-context-length", "64", *flags]),
                           tiny_checkpoint)
    assert (flagged.num_tokens, flagged.source) == (64, "--sglang-context-length")
