"""slime's run scripts through sluice's parser and checks: the Megatron flags, the LR schedule, slime's semantics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers.architectures import build_arch_checkpoint, megatron_model_args
from helpers.hand_loss import hand_batch
from sluice.config import AlgorithmConfig, ConfigError, TrainConfig, build_parser, parse_config, validate
from sluice.config.megatron_checks import check_against_checkpoint
from sluice.config.slime_compat import FLAGS, Treatment
from sluice.data import check_first_row
from sluice.rollout.sampling import sampling_params
from sluice.trainer.loss import micro_batch_loss
from sluice.trainer.optimizer import build_optimizer, lr_at

PATHS = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("qwen3")
    build_arch_checkpoint(out, "qwen3")
    return str(out), json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def gsm8k_like(tmp_path_factory) -> str:
    """A parquet file of slime's GSM8K layout: chat messages and a label."""
    path = tmp_path_factory.mktemp("data") / "train.parquet"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "label": str(2 * i)} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def model_args(hf: dict) -> list[str]:
    """slime's scripts/models/qwen3-0.6B.sh with the tiny checkpoint's sizes (it unties the embeddings)."""
    return megatron_model_args(hf)


def single_gpu_script(checkpoint: str, data: str, save: str) -> list[str]:
    """The flags of slime's scripts/run-qwen3-0.6B-single-gpu.sh, paths replaced (--ref-load: the HF model)."""
    return [
        "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "1", "--colocate",
        "--hf-checkpoint", checkpoint, "--ref-load", checkpoint, "--load", save, "--save", save,
        "--save-interval", "5", "--prompt-data", data, "--input-key", "messages", "--label-key", "label",
        "--apply-chat-template", "--rollout-shuffle", "--rm-type", "math", "--num-rollout", "10",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--global-batch-size", "8",
        "--rollout-max-response-len", "512", "--rollout-temperature", "0.8", "--rollout-top-p", "0.95",
        "--eval-interval", "10", "--skip-eval-before-train", "--eval-prompt-data", "gsm8k", data,
        "--n-samples-per-eval-prompt", "1", "--eval-max-response-len", "512", "--eval-top-k", "1",
        "--advantage-estimator", "grpo", "--calculate-per-token-loss", "--use-kl-loss", "--kl-loss-coef", "0.0",
        "--kl-loss-type", "low_var_kl", "--eps-clip", "0.2", "--eps-clip-high", "0.28", "--optimizer", "adam",
        "--lr", "1e-6", "--lr-decay-style", "constant", "--weight-decay", "0.1", "--adam-beta1", "0.9",
        "--adam-beta2", "0.98", "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--context-parallel-size", "1", "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1",
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", "4096", "--rollout-num-gpus-per-engine", "1",
        "--sglang-mem-fraction-static", "0.45", "--sglang-cuda-graph-max-bs", "8", "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0", "--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32",
        "--attention-backend", "flash",
    ]


def test_single_gpu_script_passes_parser_and_checks(qwen3, gsm8k_like, tmp_path) -> None:
    checkpoint, hf = qwen3
    argv = single_gpu_script(checkpoint, gsm8k_like, str(tmp_path / "save")) + model_args(hf)
    config = parse_config(argv)
    validate(config)
    notes: list[str] = []
    check_against_checkpoint(config, notes.append)
    check_first_row(config.data.prompt_data, config.data)
    assert config.algorithm.loss_agg_mode == "token_mean" and config.algorithm.kl_loss_coef == 0
    assert config.cluster.colocate and not config.cluster.distributed
    assert sampling_params(config.rollout, config.eval).top_k == 1
    assert sampling_params(config.rollout).top_k == -1
    assert config.train.lr_decay_iters == 10  # --num-rollout 10 x 8 samples / 8 per step
    logged = "\n".join(notes)
    for flag in ("--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32", "--attention-backend",
                 "--use-rotary-position-embeddings"):
        assert flag in logged


@pytest.mark.parametrize("flag, wrong", [
    ("--hidden-size", "128"), ("--num-layers", "3"), ("--ffn-hidden-size", "100"), ("--num-attention-heads", "8"),
    ("--num-query-groups", "4"), ("--norm-epsilon", "1e-5"), ("--rotary-base", "5"), ("--kv-channels", "32"),
])
def test_architecture_mismatch_names_both_values(qwen3, flag, wrong) -> None:
    checkpoint, hf = qwen3
    args = model_args(hf)
    args[args.index(flag) + 1] = wrong
    config = parse_config(["--hf-checkpoint", checkpoint] + args)
    with pytest.raises(ConfigError) as err:
        check_against_checkpoint(config, lambda _: None)
    message = str(err.value)
    assert f"{flag} {float(wrong) if flag in ('--norm-epsilon', '--rotary-base') else wrong}" in message
    assert "the checkpoint has" in message


def test_architecture_switches_and_padded_vocab(qwen3) -> None:
    checkpoint, hf = qwen3
    args = model_args(hf)
    config = parse_config(["--hf-checkpoint", checkpoint] + args[:] + ["--vocab-size", "128"])
    check_against_checkpoint(config, lambda _: None)  # 102 and 128 both pad to 128: Megatron's padded vocab
    for dropped in ("--qk-layernorm", "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear"):
        config = parse_config(["--hf-checkpoint", checkpoint] + [a for a in args if a != dropped])
        with pytest.raises(ConfigError, match=f"add {dropped}"):
            check_against_checkpoint(config, lambda _: None)
    config = parse_config(["--hf-checkpoint", checkpoint] + args + ["--add-qkv-bias"])
    with pytest.raises(ConfigError, match="--add-qkv-bias is given"):
        check_against_checkpoint(config, lambda _: None)
    config = parse_config(["--hf-checkpoint", checkpoint] + args + ["--vocab-size", "300"])
    with pytest.raises(ConfigError, match="--vocab-size 300, but the checkpoint has 102"):
        check_against_checkpoint(config, lambda _: None)


VALID = ["--hf-checkpoint", "m", "--prompt-data", "d.jsonl", "--rollout-batch-size", "2", "--rm-type", "math",
         "--label-key", "label"]


@pytest.mark.parametrize("extra, expected", [
    (["--tensor-model-parallel-size", "2"], "FSDP2"),
    (["--pipeline-model-parallel-size", "4"], "FSDP2"),
    (["--context-parallel-size", "2"], "FSDP2"),
    (["--expert-tensor-parallel-size", "2"], "FSDP2"),
    (["--expert-model-parallel-size", "8"], "MoE"),
    (["--optimizer", "sgd"], "sluice trains with AdamW"),
    (["--attention-dropout", "0.1"], "no dropout"),
    (["--hidden-dropout", "0.1"], "no dropout"),
    (["--lr-decay-style", "cosine"], "--lr-decay-iters"),
    (["--position-embedding-type", "learned_absolute"], "rope only"),
    (["--min-lr", "1e-3"], "--min-lr"),
])
def test_refused_values_say_why(extra, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        validate(parse_config(VALID + extra))


def test_warmup_longer_than_the_run_is_refused_only_where_the_rate_decays() -> None:
    short = VALID + ["--num-rollout", "2", "--n-samples-per-prompt", "2", "--lr-warmup-iters", "5"]
    validate(parse_config(short))  # constant after warmup: nothing decays, so nothing to overrun
    with pytest.raises(ConfigError, match="--lr-warmup-iters 5 is longer than --lr-decay-iters 2"):
        validate(parse_config(short + ["--lr-decay-style", "cosine", "--lr-decay-iters", "2"]))


def test_every_flag_of_the_table_is_understood() -> None:
    parser_flags = {option for action in build_parser()._actions for option in action.option_strings}
    for flag, (treatment, _, _) in FLAGS.items():
        if treatment is Treatment.REJECTED:
            with pytest.raises(ConfigError, match=f"{flag} is an? (slime|Megatron|SGLang) flag that sluice does not take"):
                parse_config([flag, "1"])
        else:
            assert flag in parser_flags, flag
    with pytest.raises(ConfigError, match="MoE"):
        parse_config(["--moe-grouped-gemm"])
    with pytest.raises(ConfigError, match="unknown flag --rollout-batch-sise; did you mean --rollout-batch-size"):
        parse_config(["--rollout-batch-sise", "2"])


def test_every_flag_of_the_table_is_documented() -> None:
    doc = (PATHS / "docs" / "migrating-from-slime.md").read_text()
    assert [flag for flag in FLAGS if f"`{flag}`" not in doc] == []


def schedule(**kwargs) -> list[float]:
    config = TrainConfig(lr=1.0, **kwargs)
    return [lr_at(step, config) for step in range(12)]


def test_lr_schedules_against_hand_values() -> None:
    assert schedule(lr_warmup_iters=2) == [0.5] + [1.0] * 11
    linear = schedule(lr_decay_style="linear", lr_decay_iters=10, lr_warmup_iters=2, min_lr=0.2)
    # warmup 0.5, 1.0; then 1 - 0.8 * (s - 2) / 8 from step 2 to step 10; 0.2 after
    assert linear == pytest.approx([0.5, 1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.2])
    cosine = schedule(lr_decay_style="cosine", lr_decay_iters=10, lr_warmup_fraction=0.2)  # warmup 2 steps
    expected = [0.5, 1.0] + [0.5 * (math.cos(math.pi * (s - 2) / 8) + 1) for s in range(2, 10)] + [0.0, 0.0]
    assert cosine == pytest.approx(expected)
    assert cosine[6] == pytest.approx(0.5)  # half way through the decay
    assert schedule(lr_warmup_iters=4, lr_warmup_init=0.2)[:4] == pytest.approx([0.4, 0.6, 0.8, 1.0])


def test_scheduler_applies_the_curve_and_scales_it_for_another_peak() -> None:
    config = TrainConfig(lr=0.1, lr_decay_style="linear", lr_decay_iters=4, min_lr=0.02)
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(model, config)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02, 0.02])
    critic_optimizer, _ = build_optimizer(model, config, lr=0.2)
    assert critic_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert lr_at(4, config, 0.2) == pytest.approx(0.04)  # --min-lr scaled with the peak


def test_kl_loss_with_coefficient_zero_is_logged_not_trained() -> None:
    """slime's --use-kl-loss --kl-loss-coef 0: train/kl_loss is reported, the loss and gradients are unchanged."""
    batch, log_probs = hand_batch(with_ref=True)
    num_tokens = float(batch.loss_mask.sum())
    plain, plain_metrics = micro_batch_loss(AlgorithmConfig(), batch, log_probs, None, num_tokens, 2)
    logged, metrics = micro_batch_loss(AlgorithmConfig(use_kl_loss=True, kl_loss_coef=0.0, kl_loss_type="k3"),
                                       batch, log_probs, None, num_tokens, 2)
    assert "train/kl_loss" in metrics and "train/kl_loss" not in plain_metrics
    assert metrics["train/kl_loss"] > 0
    assert logged.item() == pytest.approx(plain.item())


def test_flags_without_a_field_are_mapped_or_logged_once() -> None:
    config = parse_config(VALID + [
        "--sglang-cuda-graph-bs", "1", "2", "4", "48", "--sglang-server-concurrency", "64", "--transformer-impl",
        "transformer_engine", "--no-check-for-nan-in-loss-and-grad", "--update-weight-disk-dir", "/tmp/sync",
        "--dynamic-sampling-filter-path", "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std"])
    assert config.engine.cuda_graph_max_bs == 48
    assert config.rollout.rollout_max_concurrency == 64 * config.cluster.num_engines
    assert config.sync.weight_sync_dir == "/tmp/sync"
    assert config.rollout.dynamic_sampling_filter_path == "sluice.rollout.filters.drop_uniform_rewards"
    notes: list[str] = []
    check_against_checkpoint(config, notes.append)
    assert [n.split(" ")[0] for n in notes] == ["--transformer-impl", "--no-check-for-nan-in-loss-and-grad",
                                                "--calculate-per-token-loss"]
    assert "own model code" in notes[0]
    with pytest.raises(ConfigError, match="--sglang-cuda-graph-bs takes integers, got 'x'"):
        parse_config(VALID + ["--sglang-cuda-graph-bs", "x"])


def test_a_slime_script_without_calculate_per_token_loss_hears_how_the_loss_is_averaged() -> None:
    def notes_of(*flags: str) -> list[str]:
        notes: list[str] = []
        check_against_checkpoint(parse_config(VALID + list(flags)), notes.append)
        return [note for note in notes if note.startswith("--calculate-per-token-loss")]

    (note,) = notes_of("--transformer-impl", "local")
    assert "slime would average the loss per sample" in note and "--loss-agg-mode seq_mean_token_mean" in note
    assert notes_of("--transformer-impl", "local", "--calculate-per-token-loss") == []
    assert notes_of("--transformer-impl", "local", "--loss-agg-mode", "seq_mean_token_mean") == []
    assert notes_of() == []  # not a slime script: sluice's default needs no word


def test_server_concurrency_and_an_explicit_rollout_max_concurrency_must_agree() -> None:
    engines = parse_config(VALID).cluster.num_engines
    agreeing = parse_config(VALID + ["--sglang-server-concurrency", "64", "--rollout-max-concurrency", str(64 * engines)])
    assert agreeing.rollout.rollout_max_concurrency == 64 * engines
    with pytest.raises(ConfigError, match=(rf"--sglang-server-concurrency 64 \(x {engines} engine\(s\) = {64 * engines} "
                                           r"requests in flight\) disagrees with --rollout-max-concurrency 1000")):
        parse_config(VALID + ["--rollout-max-concurrency", "1000", "--sglang-server-concurrency", "64"])


def test_disable_compute_advantages_is_for_sft_only() -> None:
    validate(parse_config(VALID + ["--loss-type", "sft_loss", "--disable-compute-advantages-and-returns"]))
    with pytest.raises(ConfigError, match="--disable-compute-advantages-and-returns: sluice skips advantages only"):
        validate(parse_config(VALID + ["--disable-compute-advantages-and-returns"]))


def test_refused_flags_name_origin_and_alternative() -> None:
    for flag, words, expected in (
            ("--multi-latent-attention", [], "is a Megatron flag that sluice does not take: multi-latent attention"),
            ("--sglang-speculative-algorithm", ["EAGLE"], "is an SGLang flag that sluice does not take: speculative"),
            ("--use-opd", [], "is a slime flag that sluice does not take: on-policy distillation"),
            ("--sglang-not-a-flag", ["1"], "unknown flag --sglang-not-a-flag: the engine does not support")):
        with pytest.raises(ConfigError, match=expected):
            parse_config(VALID + [flag] + words)


def torch_dist_dir(root: Path) -> Path:
    """Megatron's torch_dist layout as slime's tools write it (tiny stand-in files)."""
    iteration = root / "iter_0000005"
    iteration.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    for name in ("__0_0.distcp", "__0_1.distcp", "common.pt", "metadata.json"):
        (iteration / name).write_bytes(b"\0")
    return root


@pytest.mark.parametrize("flag", ["--ref-load", "--load"])
def test_a_torch_dist_checkpoint_is_refused_before_any_model_loads(flag, qwen3, gsm8k_like, tmp_path) -> None:
    from sluice.checkpoint.megatron_dir import is_torch_dist_checkpoint
    from sluice.orchestration.builder import build_run

    megatron = torch_dist_dir(tmp_path / "Qwen3-0.6B_torch_dist")
    assert is_torch_dist_checkpoint(megatron) and is_torch_dist_checkpoint(megatron / "iter_0000005")
    assert not is_torch_dist_checkpoint(qwen3[0]) and not is_torch_dist_checkpoint(tmp_path / "absent")
    config = parse_config(["--hf-checkpoint", qwen3[0], "--prompt-data", gsm8k_like, "--input-key", "messages",
                           "--rollout-batch-size", "2", "--rm-type", "math", "--train-device", "cpu",
                           flag, str(megatron)])
    logged: list[str] = []
    with pytest.raises(ConfigError) as err:
        build_run(config, logged.append)
    message = str(err.value)
    assert message.startswith(f"{flag} {megatron} is a Megatron torch_dist checkpoint")
    assert "tools/convert_torch_dist_to_hf.py" in message and "Hugging Face" in message
    assert logged == []  # refused first: nothing was checked, loaded or logged before
