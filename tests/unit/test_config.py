"""The config tree as users reach it: flags, YAML files, validation and saved configs."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from sluice.config import (
    BUILTIN_REWARDS,
    Config,
    ConfigError,
    build_parser,
    config_to_dict,
    parse_config,
    save_config,
    validate,
)

# A minimal training run that passes validation; each validation test breaks one thing.
VALID_TRAINING = [
    "--hf-checkpoint", "models/tiny", "--prompt-data", "data/train.jsonl",
    "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--rm-type", "math", "--label-key", "answer",
]


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- parser structure -------------------------------------------------------------------------


def test_defaults_parse_to_default_config() -> None:
    assert parse_config([]) == Config()


def test_every_field_has_one_flag() -> None:
    parser = build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    dests = {a.dest for a in parser._actions} - {"help", "config"}
    # slime / Megatron / SGLang flags without a field of their own (no-ops, mapped) are the compatibility table's
    compat = {d for d in dests if d.startswith("compat:")}
    assert compat and dests - compat == set(config_to_dict(Config()))


def test_help_shows_metadata_and_defaults() -> None:
    text = build_parser().format_help()
    assert "Responses sampled per prompt (the GRPO group size)." in text
    assert "(default: 1024)" in text
    assert "--no-use-kl-loss" in text
    assert "--config FILE" in text
    assert "--sglang-mem-fraction-static" in text


def test_abbreviations_are_not_accepted() -> None:
    with pytest.raises(ConfigError, match="unknown flag --rollout-batch;"):
        parse_config(["--rollout-batch", "4"])


# --- slime flags land in their sections ------------------------------------------------------


def test_slime_flags_map_to_sections() -> None:
    config = parse_config([
        "--hf-checkpoint", "ckpt/qwen", "--prompt-data", "data/p.jsonl", "--input-key", "question",
        "--label-key", "answer", "--metadata-key", "meta", "--apply-chat-template", "--rollout-shuffle",
        "--rollout-seed", "7", "--rollout-max-prompt-len", "512", "--rollout-batch-size", "16",
        "--n-samples-per-prompt", "8", "--rollout-max-response-len", "2048", "--rollout-temperature", "0.7",
        "--rollout-top-p", "0.9", "--rollout-top-k", "50", "--global-batch-size", "32",
        "--micro-batch-size", "4", "--num-rollout", "100", "--num-epoch", "3", "--lr", "2e-6",
        "--clip-grad", "0.5", "--seed", "99", "--advantage-estimator", "grpo", "--eps-clip", "0.1",
        "--eps-clip-high", "0.28", "--use-kl-loss", "--kl-loss-coef", "0.01", "--kl-loss-type", "k2",
        "--entropy-coef", "0.001", "--rm-type", "boxed_math", "--custom-rm-path", "my.mod.reward",
        "--eval-interval", "5", "--eval-prompt-data", "aime", "data/aime.jsonl", "gsm", "data/gsm.jsonl",
        "--n-samples-per-eval-prompt", "4", "--save", "out/ckpt", "--load", "out/old", "--save-interval", "10",
    ])
    assert config.model.hf_checkpoint == "ckpt/qwen"
    data = config.data
    assert (data.prompt_data, data.input_key, data.label_key, data.metadata_key) == (
        "data/p.jsonl", "question", "answer", "meta")
    assert data.apply_chat_template is True and data.rollout_shuffle is True
    assert (data.rollout_seed, data.rollout_max_prompt_len) == (7, 512)
    rollout = config.rollout
    assert (rollout.rollout_batch_size, rollout.n_samples_per_prompt, rollout.rollout_max_response_len) == (
        16, 8, 2048)
    assert (rollout.rollout_temperature, rollout.rollout_top_p, rollout.rollout_top_k) == (0.7, 0.9, 50)
    assert (rollout.num_rollout, rollout.num_epoch) == (100, 3)
    train = config.train
    assert (train.global_batch_size, train.micro_batch_size, train.lr, train.clip_grad, train.seed) == (
        32, 4, 2e-6, 0.5, 99)
    algo = config.algorithm
    assert (algo.advantage_estimator, algo.eps_clip, algo.eps_clip_high) == ("grpo", 0.1, 0.28)
    assert (algo.use_kl_loss, algo.kl_loss_coef, algo.kl_loss_type, algo.entropy_coef) == (
        True, 0.01, "k2", 0.001)
    assert (config.reward.rm_type, config.reward.custom_rm_path) == ("boxed_math", "my.mod.reward")
    assert config.eval.eval_interval == 5
    assert config.eval.eval_prompt_data == ["aime", "data/aime.jsonl", "gsm", "data/gsm.jsonl"]
    assert config.eval_sets == [("aime", "data/aime.jsonl"), ("gsm", "data/gsm.jsonl")]
    assert config.eval.n_samples_per_eval_prompt == 4
    ckpt = config.checkpoint
    assert (ckpt.save, ckpt.load, ckpt.save_interval) == ("out/ckpt", "out/old", 10)


def test_numbers_are_typed() -> None:
    config = parse_config(["--rollout-batch-size", "8", "--lr", "1e-5", "--rollout-top-k", "-1"])
    assert type(config.rollout.rollout_batch_size) is int
    assert type(config.train.lr) is float
    assert config.rollout.rollout_top_k == -1


def test_list_flags() -> None:
    config = parse_config(["--rollout-stop", "</s>", "\n\n", "--rollout-stop-token-ids", "2", "7"])
    assert config.rollout.rollout_stop == ["</s>", "\n\n"]
    assert config.rollout.rollout_stop_token_ids == [2, 7]


def test_bool_flags_and_negation() -> None:
    assert parse_config(["--use-kl-loss"]).algorithm.use_kl_loss is True
    assert parse_config(["--use-kl-loss", "--no-use-kl-loss"]).algorithm.use_kl_loss is False
    assert parse_config(["--no-progress-bar"]).logging.progress_bar is False
    assert parse_config([]).logging.progress_bar is True


def test_json_dict_flag() -> None:
    config = parse_config(["--apply-chat-template-kwargs", '{"enable_thinking": false, "n": 2}'])
    assert config.data.apply_chat_template_kwargs == {"enable_thinking": False, "n": 2}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_bad_json_dict_flag_names_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--apply-chat-template-kwargs"):
        parse_config(["--apply-chat-template-kwargs", text])


# --- engine (SGLang) flags -------------------------------------------------------------------


def test_sglang_flags_land_in_engine() -> None:
    config = parse_config(["--sglang-mem-fraction-static", "0.5", "--sglang-dtype", "bfloat16"])
    assert config.engine.mem_fraction_static == 0.5
    assert config.engine.dtype == "bfloat16"
    assert config.train.train_dtype == "float32"


def test_unknown_sglang_flag_lists_supported() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(["--sglang-tp-size", "2"])
    message = str(err.value)
    assert "--sglang-tp-size" in message
    assert "does not support" in message
    assert "--sglang-mem-fraction-static" in message and "--sglang-max-running-requests" in message


def test_unknown_sglang_flag_suggests_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean --sglang-mem-fraction-static"):
        parse_config(["--sglang-mem-fraction", "0.5"])


# --- command-line errors ---------------------------------------------------------------------


def test_unknown_flag_suggests_closest() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(["--rollout-batchsize", "4"])
    assert str(err.value) == "unknown flag --rollout-batchsize; did you mean --rollout-batch-size?"


def test_unknown_flag_with_equals_sign() -> None:
    with pytest.raises(ConfigError, match=r"unknown flag --lrr; did you mean --lr\?"):
        parse_config(["--lrr=0.1"])


def test_unknown_flag_without_close_match() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(["--zzzzqqq"])
    assert str(err.value) == "unknown flag --zzzzqqq"


def test_stray_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'oops'"):
        parse_config(["oops"])


@pytest.mark.parametrize(("argv", "flag"), [
    (["--rollout-batch-size", "four"], "--rollout-batch-size"),
    (["--lr", "fast"], "--lr"),
    (["--rollout-stop-token-ids", "2", "x"], "--rollout-stop-token-ids"),
    (["--kl-loss-type", "k9"], "--kl-loss-type"),
    (["--loss-type", "dpo"], "--loss-type"),
    (["--tis-mode", "segment"], "--tis-mode"),
    (["--rollout-batch-size"], "--rollout-batch-size"),
])
def test_bad_cli_values_name_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        parse_config(argv)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- YAML files ------------------------------------------------------------------------------


def test_yaml_both_spellings_and_cli_override(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, (
        "rollout-batch-size: 8\n"
        "n_samples_per_prompt: 4\n"
        "rollout_temperature: 0.7\n"
        "use-kl-loss: true\n"
        "kl_loss_coef: 0.01\n"
        "sglang-mem-fraction-static: 0.6\n"
        "eval_prompt_data: [aime, data/aime.jsonl]\n"
    ))
    config = parse_config(["--config", str(path), "--rollout-batch-size", "16",
                           "--rollout-temperature", "1.0", "--no-use-kl-loss"])
    assert config.rollout.rollout_batch_size == 16  # CLI wins
    assert config.rollout.n_samples_per_prompt == 4  # file value kept where no flag was given
    assert config.rollout.rollout_temperature == 1.0  # a flag equal to the default still overrides
    assert config.algorithm.use_kl_loss is False
    assert config.algorithm.kl_loss_coef == 0.01
    assert config.engine.mem_fraction_static == 0.6
    assert config.eval.eval_prompt_data == ["aime", "data/aime.jsonl"]


def test_yaml_config_after_flags_still_loses(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "lr: 0.5\n")
    assert parse_config(["--lr", "0.25", "--config", str(path)]).train.lr == 0.25


def test_yaml_numbers_are_coerced(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "lr: 1e-6\nclip_grad: 2\neps_clip_high: null\n")
    config = parse_config(["--config", str(path)])
    assert config.train.lr == 1e-6 and type(config.train.lr) is float
    assert config.train.clip_grad == 2.0 and type(config.train.clip_grad) is float
    assert config.algorithm.eps_clip_high is None


def test_yaml_dict_as_mapping_or_json(tmp_path: Path) -> None:
    as_mapping = write_yaml(tmp_path, "apply_chat_template_kwargs: {enable_thinking: false}\n", "a.yaml")
    as_json = write_yaml(tmp_path, "apply_chat_template_kwargs: '{\"enable_thinking\": false}'\n", "b.yaml")
    for path in (as_mapping, as_json):
        assert parse_config(["--config", str(path)]).data.apply_chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize(("text", "key"), [
    ("rollout_batch_size: '8'\n", "rollout_batch_size"),
    ("rollout-batch-size: true\n", "rollout-batch-size"),
    ("lr: fast\n", "lr"),
    ("use_kl_loss: 1\n", "use_kl_loss"),
    ("rollout_stop_token_ids: [1, a]\n", "rollout_stop_token_ids"),
    ("rollout_stop: '</s>'\n", "rollout_stop"),
    ("kl_loss_type: k9\n", "kl_loss_type"),
    ("n_samples_per_prompt: null\n", "n_samples_per_prompt"),
    ("apply_chat_template_kwargs: '{bad'\n", "apply_chat_template_kwargs"),
    ("hf_checkpoint: 3\n", "hf_checkpoint"),
])
def test_yaml_type_errors_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert str(path) in str(err.value)
    assert repr(key) in str(err.value)


def test_yaml_type_error_says_what_was_expected(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "rollout_batch_size: '8'\n")
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_config(["--config", str(path)])


def test_unknown_yaml_key_names_file_and_suggests(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "rollout_batchsize: 4\n")
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert str(err.value) == f"{path}: unknown key 'rollout_batchsize'; did you mean 'rollout_batch_size'?"


def test_unknown_yaml_key_suggests_in_dash_spelling(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "rollout-batchsize: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'rollout-batch-size'"):
        parse_config(["--config", str(path)])


def test_unknown_sglang_yaml_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "sglang_tp_size: 2\n")
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert str(path) in str(err.value) and "sglang_tp_size" in str(err.value)
    assert "does not support" in str(err.value) and "--sglang-dtype" in str(err.value)


def test_yaml_key_in_both_spellings_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "rollout-batch-size: 4\nrollout_batch_size: 8\n")
    with pytest.raises(ConfigError, match="twice"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(("text", "expected"), [
    ("- a\n- b\n", "expected a mapping"),
    ("lr: [unclosed\n", "invalid YAML"),
])
def test_malformed_yaml_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as err:
        parse_config(["--config", str(path)])
    assert str(path) in str(err.value)


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_empty_yaml_file_is_defaults(tmp_path: Path) -> None:
    assert parse_config(["--config", str(write_yaml(tmp_path, ""))]) == Config()


# --- validation ------------------------------------------------------------------------------


def test_valid_training_config_passes() -> None:
    validate(parse_config(VALID_TRAINING))


@pytest.mark.parametrize(("extra", "flags"), [
    (["--rollout-batch-size", "0"], ["--rollout-batch-size"]),
    (["--rollout-max-concurrency", "0"], ["--rollout-max-concurrency"]),
    (["--ref-update-interval", "2"], ["--ref-update-interval", "--use-kl-loss"]),
    (["--use-kl-loss", "--kl-loss-coef", "0.1", "--ref-update-interval", "0"], ["--ref-update-interval"]),
    (["--n-samples-per-prompt", "0"], ["--n-samples-per-prompt"]),
    (["--global-batch-size", "3"], ["--global-batch-size", "--rollout-batch-size", "--n-samples-per-prompt"]),
    (["--global-batch-size", "0"], ["--global-batch-size"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size"]),
    (["--rollout-temperature", "0"], ["--rollout-temperature"]),
    (["--eval-temperature", "-0.5"], ["--eval-temperature"]),
    (["--rollout-top-p", "0"], ["--rollout-top-p"]),
    (["--rollout-top-p", "1.5"], ["--rollout-top-p"]),
    (["--eval-top-p", "0"], ["--eval-top-p"]),
    (["--rollout-top-k", "0"], ["--rollout-top-k"]),
    (["--rollout-top-k", "-2"], ["--rollout-top-k"]),
    (["--eps-clip", "0"], ["--eps-clip"]),
    (["--eps-clip-high", "-0.1"], ["--eps-clip-high"]),
    (["--kl-loss-coef", "0.1"], ["--kl-loss-coef", "--use-kl-loss"]),
    (["--use-kl-loss", "--kl-loss-coef", "-1"], ["--kl-loss-coef"]),
    (["--kl-loss-type", "k3"], ["--kl-loss-type", "--use-kl-loss", "no effect"]),
    (["--kl-loss-type", "low_var_kl"], ["--kl-loss-type", "--use-kl-loss", "no effect"]),
    (["--eval-prompt-data", "aime", "data/aime.jsonl", "gsm"], ["--eval-prompt-data"]),
    (["--eval-interval", "0"], ["--eval-interval"]),
    (["--n-samples-per-eval-prompt", "0"], ["--n-samples-per-eval-prompt"]),
    (["--save-interval", "5"], ["--save-interval", "--save"]),
    (["--save", "out", "--save-interval", "0"], ["--save-interval"]),
    (["--lr", "-0.5"], ["--lr"]),
    (["--clip-grad", "-1"], ["--clip-grad"]),
    (["--lr-warmup-iters", "-1"], ["--lr-warmup-iters"]),
    (["--custom-rm-path", "my.reward"], ["--rm-type", "--custom-rm-path"]),
    (["--rm-type", "fuzzy"], ["--rm-type", "boxed_math"]),
    (["--num-rollout", "0"], ["--num-rollout"]),
    (["--num-epoch", "0"], ["--num-epoch"]),
    (["--rollout-max-response-len", "0"], ["--rollout-max-response-len"]),
    (["--rollout-max-prompt-len", "0"], ["--rollout-max-prompt-len"]),
    (["--sglang-mem-fraction-static", "1.5"], ["--sglang-mem-fraction-static"]),
    (["--sglang-max-running-requests", "0"], ["--sglang-max-running-requests"]),
    (["--sglang-page-size", "6"], ["--sglang-page-size", "power of two"]),
    (["--sglang-max-total-tokens", "0"], ["--sglang-max-total-tokens"]),
    (["--eps-clip-c", "1.0"], ["--eps-clip-c", "> 1"]),
    (["--advantage-estimator", "cispo", "--eps-clip-c", "3"], ["--eps-clip-c", "cispo"]),
    (["--use-tis", "--tis-clip", "0.5", "--tis-clip-low", "0.5"], ["--tis-clip", "--tis-clip-low"]),
    (["--tis-clip-low", "-0.1"], ["--tis-clip-low"]),
    (["--use-tis", "--use-rollout-logprobs"], ["--use-tis", "--use-rollout-logprobs"]),
    *((["--tis-mode", mode], ["--tis-mode", "--use-tis", "no effect"]) for mode in ("sequence", "geometric", "icepop")),
    (["--loss-type", "sft_loss", "--use-tis"], ["--use-tis", "--loss-type"]),
    (["--loss-type", "sft_loss", "--normalize-advantages"], ["--normalize-advantages", "--loss-type"]),
    # KL as a reward penalty, the token-level estimators and the critic
    (["--kl-coef", "-0.1"], ["--kl-coef", ">= 0"]),
    (["--loss-type", "sft_loss", "--kl-coef", "0.1"], ["--kl-coef", "--loss-type sft_loss", "no effect"]),
    (["--gamma", "0.9"], ["--gamma", "--advantage-estimator grpo", "no effect"]),
    (["--kl-coef", "0.1", "--n-samples-per-prompt", "1"], ["--kl-coef", "--n-samples-per-prompt 1", "no effect"]),
    (["--advantage-estimator", "ppo", "--gamma", "1.5"], ["--gamma", "[0, 1]"]),
    (["--advantage-estimator", "ppo", "--lambd", "-0.1"], ["--lambd", "[0, 1]"]),
    (["--advantage-estimator", "reinforce_plus_plus", "--lambd", "0.9"], ["--lambd", "only ppo"]),
    (["--value-clip", "0.5"], ["--value-clip", "only ppo"]),
    (["--num-critic-only-steps", "2"], ["--num-critic-only-steps", "only ppo"]),
    (["--critic-lr", "1e-5"], ["--critic-lr", "only ppo"]),
    (["--critic-load", "some/critic"], ["--critic-load", "only ppo"]),
    (["--advantage-estimator", "ppo", "--value-clip", "0"], ["--value-clip", "> 0"]),
    (["--advantage-estimator", "ppo", "--num-critic-only-steps", "-1"], ["--num-critic-only-steps"]),
    (["--advantage-estimator", "ppo", "--critic-lr", "-1"], ["--critic-lr"]),
    (["--advantage-estimator", "ppo", "--loss-type", "sft_loss"], ["--advantage-estimator ppo", "sft_loss"]),
    (["--ref-update-interval", "2", "--kl-coef", "0"], ["--ref-update-interval", "--kl-coef"]),
    (["--advantage-estimator", "ppo", "--disable-rewards-normalization"], ["--disable-rewards-normalization"]),
    (["--disable-rewards-normalization", "--disable-grpo-std-normalization"],
     ["--disable-grpo-std-normalization", "--disable-rewards-normalization"]),
    # custom losses
    (["--loss-type", "custom_loss"], ["--loss-type custom_loss", "--custom-loss-function-path"]),
    (["--custom-loss-function-path", "my.loss"], ["--custom-loss-function-path", "--loss-type custom_loss"]),
    (["--loss-type", "custom_loss", "--custom-loss-function-path", "my.loss", "--use-tis"], ["--use-tis", "custom"]),
    # packing
    (["--no-use-dynamic-batch-size", "--max-tokens-per-gpu", "512"],
     ["--max-tokens-per-gpu", "--no-use-dynamic-batch-size", "no effect"]),
    (["--use-dynamic-batch-size", "--max-tokens-per-gpu", "1"], ["--max-tokens-per-gpu", ">= 2"]),
    (["--log-probs-chunk-size", "0"], ["--log-probs-chunk-size", ">= 1"]),
    (["--recompute-num-layers", "0"], ["--recompute-num-layers", ">= 1"]),
    # the host optimizer needs whole weights on each process: no FSDP pool of GPUs
    (["--optimizer-cpu-offload", "--orchestrator", "ray", "--actor-num-gpus-per-node", "2"],
     ["--optimizer-cpu-offload", "2 GPUs", "FSDP"]),
])
def test_validation_rules_name_flags(extra: list[str], flags: list[str]) -> None:
    config = parse_config(VALID_TRAINING + extra)
    with pytest.raises(ConfigError) as err:
        validate(config)
    for flag in flags:
        assert flag in str(err.value)


@pytest.mark.parametrize("flag", ["--hf-checkpoint", "--prompt-data", "--rollout-batch-size"])
def test_training_requires(flag: str) -> None:
    index = VALID_TRAINING.index(flag)
    argv = VALID_TRAINING[:index] + VALID_TRAINING[index + 2:]
    with pytest.raises(ConfigError, match=f"{flag} is required for training"):
        validate(parse_config(argv))
    validate(parse_config(argv), for_training=False)


def test_policy_loss_needs_a_reward_but_sft_does_not() -> None:
    index = VALID_TRAINING.index("--rm-type")
    argv = VALID_TRAINING[:index] + VALID_TRAINING[index + 2:]
    with pytest.raises(ConfigError, match="--loss-type policy_loss needs a reward"):
        validate(parse_config(argv))
    validate(parse_config(argv + ["--loss-type", "sft_loss"]))


def test_custom_reward_alone_is_valid() -> None:
    index = VALID_TRAINING.index("--rm-type")
    validate(parse_config(VALID_TRAINING[:index] + ["--custom-rm-path", "my.reward"]))


@pytest.mark.parametrize("rm_type", BUILTIN_REWARDS)
def test_builtin_rewards_are_valid(rm_type: str) -> None:
    url = ["--rm-url", "http://127.0.0.1:8000/score"] if rm_type == "remote_rm" else []
    validate(parse_config(VALID_TRAINING + ["--rm-type", rm_type] + url))


def test_builtin_rewards_list() -> None:
    assert set(BUILTIN_REWARDS) == {"exact", "math", "f1", "deepscaler", "boxed_exact", "boxed_math", "boxed_f1",
                                    "remote_rm", "random"}


@pytest.mark.parametrize("extra", [
    ["--eval-temperature", "0"],
    ["--rollout-top-k", "1"],
    ["--rollout-top-p", "1.0"],
    ["--global-batch-size", "4"],
    ["--use-kl-loss", "--kl-loss-coef", "0.01"],
    ["--eps-clip-high", "0"],
    ["--save", "out", "--save-interval", "5"],
    ["--eval-prompt-data", "aime", "data/aime.jsonl"],
    ["--lr", "0"],
    ["--optimizer-cpu-offload"],
    ["--optimizer-cpu-offload", "--orchestrator", "ray", "--actor-num-gpus-per-node", "2", "--train-device", "cpu"],
])
def test_boundary_values_are_valid(extra: list[str]) -> None:
    validate(parse_config(VALID_TRAINING + extra))


def test_validation_reports_every_problem() -> None:
    config = parse_config(VALID_TRAINING + ["--lr", "-1", "--eps-clip", "0"])
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert "--lr" in str(err.value) and "--eps-clip" in str(err.value)


def test_rollout_batch_size_optional_outside_training() -> None:
    validate(Config(), for_training=False)
    with pytest.raises(ConfigError, match="--rollout-batch-size"):
        validate(Config())


def test_low_var_kl_keeps_its_name() -> None:
    """low_var_kl is k3 with a clamp (as in slime), not an alias of it."""
    assert parse_config(["--kl-loss-type", "low_var_kl"]).algorithm.kl_loss_type == "low_var_kl"


# --- saving ----------------------------------------------------------------------------------


def test_config_to_dict_is_flat_with_underscore_keys() -> None:
    config = parse_config(["--rollout-batch-size", "8", "--sglang-mem-fraction-static", "0.5"])
    flat = config_to_dict(config)
    assert flat["rollout_batch_size"] == 8
    assert flat["sglang_mem_fraction_static"] == 0.5
    assert all("-" not in key for key in flat)
    assert not any(dataclasses.is_dataclass(v) for v in flat.values())


def test_config_to_dict_copies_lists() -> None:
    config = parse_config(["--eval-prompt-data", "a", "b"])
    config_to_dict(config)["eval_prompt_data"].append("c")
    assert config.eval.eval_prompt_data == ["a", "b"]


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = parse_config(VALID_TRAINING + [
        "--lr", "3e-7", "--use-kl-loss", "--kl-loss-coef", "0.02", "--eval-prompt-data", "aime", "a.jsonl",
        "--rollout-stop", "</s>", "1.0", "--rollout-stop-token-ids", "5", "--no-progress-bar",
        "--apply-chat-template-kwargs", '{"enable_thinking": false}', "--sglang-dtype", "bfloat16",
        "--label-key", "true", "--eps-clip-high", "0.28",
    ])
    path = tmp_path / "nested" / "config.yaml"
    save_config(config, path)
    assert yaml.safe_load(path.read_text())["lr"] == 3e-7
    loaded = parse_config(["--config", str(path)])
    assert loaded == config
    assert loaded.data.label_key == "true" and loaded.rollout.rollout_stop == ["</s>", "1.0"]


def test_default_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    assert parse_config(["--config", str(path)]) == Config()


def test_builtin_reward_without_label_key_is_an_error() -> None:
    index = VALID_TRAINING.index("--label-key")
    config = parse_config(VALID_TRAINING[:index] + VALID_TRAINING[index + 2:])
    with pytest.raises(ConfigError, match="--rm-type math .*--label-key"):
        validate(config)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "gspo", "cispo", "rloo", "reinforce_plus_plus",
                                       "reinforce_plus_plus_baseline", "ppo"])
def test_advantage_estimators_parse_and_pick_their_policy_loss(estimator: str) -> None:
    config = parse_config(VALID_TRAINING + ["--advantage-estimator", estimator])
    validate(config)
    expected = {"gspo": "gspo", "cispo": "cispo"}.get(estimator, "ppo_clip")
    assert config.algorithm.policy_loss_name == expected


def test_algorithm_flags_parse_with_their_defaults() -> None:
    algo = parse_config(VALID_TRAINING).algorithm
    assert (algo.eps_clip_c, algo.loss_agg_mode, algo.normalize_advantages) == (None, "token_mean", False)
    assert (algo.use_rollout_logprobs, algo.use_tis, algo.tis_clip, algo.tis_clip_low) == (False, False, 2.0, 0.0)
    algo = parse_config(VALID_TRAINING + [
        "--eps-clip-c", "3", "--loss-agg-mode", "seq_mean_token_sum_norm", "--normalize-advantages",
        "--use-tis", "--tis-clip", "1.5", "--tis-clip-low", "0.1"]).algorithm
    assert (algo.eps_clip_c, algo.loss_agg_mode, algo.normalize_advantages) == (3.0, "seq_mean_token_sum_norm", True)
    assert (algo.use_tis, algo.tis_clip, algo.tis_clip_low) == (True, 1.5, 0.1)
    with pytest.raises(ConfigError, match="--loss-agg-mode"):
        parse_config(VALID_TRAINING + ["--loss-agg-mode", "seq_sum"])


@pytest.mark.parametrize("extra", [
    ["--kl-coef", "0.05"],  # a reward penalty works with every estimator
    ["--advantage-estimator", "rloo", "--kl-coef", "0.05", "--kl-loss-type", "k3", "--ref-update-interval", "4"],
    ["--advantage-estimator", "reinforce_plus_plus", "--kl-coef", "0.01", "--gamma", "0.99"],
    ["--advantage-estimator", "ppo", "--gamma", "0.99", "--lambd", "0.95", "--value-clip", "0.5",
     "--num-critic-only-steps", "2", "--critic-lr", "1e-5", "--critic-load", "ckpt/critic"],
    ["--loss-type", "custom_loss", "--custom-loss-function-path", "my_losses.py:loss"],
    ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "4096"],
    ["--advantage-estimator", "rloo", "--disable-rewards-normalization", "--kl-coef", "0.1"],
    ["--advantage-estimator", "reinforce_plus_plus", "--kl-coef", "0.1", "--n-samples-per-prompt", "1"],
])
def test_algorithm_combinations_that_take_effect_are_valid(extra: list[str]) -> None:
    config = parse_config(VALID_TRAINING + extra)
    validate(config)


def test_token_level_and_critic_flags_parse_with_slime_defaults() -> None:
    config = parse_config(VALID_TRAINING)
    algo, train = config.algorithm, config.train
    assert (algo.kl_coef, algo.gamma, algo.lambd) == (0.0, 1.0, 1.0)
    assert (algo.value_clip, algo.num_critic_only_steps) == (0.2, 0)
    assert (train.critic_load, train.critic_lr, train.use_dynamic_batch_size, train.max_tokens_per_gpu) == (
        None, None, True, None)  # packed by default, the token budget derived by the trainer
    assert not algo.needs_reference and not algo.uses_critic
    algo = parse_config(VALID_TRAINING + ["--advantage-estimator", "ppo", "--kl-coef", "0.1"]).algorithm
    assert algo.needs_reference and algo.uses_critic and algo.policy_loss_name == "ppo_clip"
