"""Guards: non-finite steps are skipped, counted, and stop the run when they repeat; out-of-memory errors name
the flags to turn. Every failure is real: NaN rewards, a NaN weight, allocations that cannot succeed."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sluice.cli import main
from sluice.config import parse_config
from sluice.observability.metrics import read_metrics
from sluice.orchestration.oom import explain_oom, oom_advice
from sluice.trainer.batching import collate
from sluice.trainer.guards import NonFiniteTraining
from helpers.train_loop import flags, run_loop
from helpers.trainer import PAD, make_trainer, random_samples

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

# A reward that is NaN for prompts starting with "a" (a broken verifier), exact match otherwise.
POISONED_REWARD = '''
async def reward(sample):
    if str(sample.prompt).startswith("a"):
        return float("nan")
    return float(sample.response.strip() == str(sample.label))
'''


@pytest.fixture
def poisoned_reward(tmp_path, monkeypatch):
    (tmp_path / "poisoned_rm.py").write_text(POISONED_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "poisoned_rm.reward"


def reward_flags(argv: list[str], reward_path: str) -> list[str]:
    at = argv.index("--rm-type")
    return argv[:at] + ["--custom-rm-path", reward_path] + argv[at + 2:]


def test_a_nan_reward_skips_that_step_only_and_counts_it(say7, tmp_path, poisoned_reward, caplog):
    root, model, data = say7
    prompts = tmp_path / "prompts.jsonl"  # one prompt per rollout, in file order: a NaN rollout in the middle
    prompts.write_text("".join(json.dumps({"input": f"{c}: say 7", "label": "7"}) + "\n" for c in "bac"))
    argv = reward_flags(flags(model, prompts, tmp_path / "run", tmp_path / "ckpt", 3, "--rollout-batch-size", "1",
                              "--no-rollout-shuffle", "--save-interval", "1",
                              "--max-consecutive-nonfinite-steps", "2"), poisoned_reward)
    with caplog.at_level(logging.WARNING, logger="sluice.trainer"):
        run = run_loop(argv)
    records = [r for r in read_metrics(tmp_path / "run") if r["step"] > 0]
    assert [r["train/nonfinite_skipped_steps"] for r in records] == [0, 1, 0]
    assert [r["train/nonfinite_skipped_total"] for r in records] == [0, 1, 1]
    assert records[1]["train/loss"] is None  # NaN, written as null
    assert isinstance(records[2]["train/loss"], float)
    assert "skipped an optimizer step: loss=nan" in caplog.text
    assert run.trainer.backend.num_optimizer_steps == 2
    # The skipped step left the weights (and the optimizer) exactly as the step before left them.
    before, after = (torch.load(tmp_path / "ckpt" / f"rollout_00000{i}" / "trainer.pt", weights_only=False)
                     for i in (0, 1))
    for name, value in before["model"].items():
        assert torch.equal(value, after["model"][name]), name
    assert after["optimizer"]["state"][0]["step"] == before["optimizer"]["state"][0]["step"]
    assert all(torch.isfinite(p).all() for p in run.trainer.backend.model.parameters())


def test_consecutive_nan_steps_stop_the_run_with_a_clear_message(say7, tmp_path, poisoned_reward, capsys):
    root, model, data = say7
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"input": "a: say 7", "label": "7"}) + "\n")
    argv = reward_flags(flags(model, prompts, tmp_path / "run", tmp_path / "ckpt", 5, "--rollout-batch-size", "1",
                              "--max-consecutive-nonfinite-steps", "2"), poisoned_reward)
    assert main(["train", *argv]) == 1
    err = capsys.readouterr().err
    assert "sluice train: error: stopping: 2 optimizer steps in a row had a non-finite loss or gradient" in err
    assert "--max-consecutive-nonfinite-steps 2" in err
    assert [r["train/nonfinite_skipped_total"] for r in read_metrics(tmp_path / "run")] == [1]


def test_a_nan_weight_skips_the_trainer_step_and_then_stops(small_checkpoint):
    trainer = make_trainer(small_checkpoint, max_consecutive_nonfinite_steps=2)
    samples, advantages = random_samples(6, seed=0)
    batch = collate(samples, advantages, PAD)
    with torch.no_grad():
        down_proj = next(p for n, p in trainer.model.named_parameters() if n.endswith("layers.0.mlp.down_proj.weight"))
        down_proj[0, 0] = float("nan")  # a poisoned weight
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    metrics = trainer.train_step(batch)
    assert torch.isnan(torch.tensor(metrics["train/loss"]))
    assert trainer.num_optimizer_steps == 0 and trainer.guard.num_skipped == 1
    assert trainer.optimizer.state_dict()["state"] == {}  # AdamW never stepped: no moments
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param, before[name], equal_nan=True, atol=0, rtol=0, msg=name)
        assert param.grad is None, name
    with pytest.raises(NonFiniteTraining, match="2 optimizer steps in a row"):
        trainer.train_step(batch)


def test_out_of_memory_at_engine_start_names_the_engine_knobs(say7, tmp_path, capsys):
    root, model, data = say7
    # A KV pool of 10^13 tokens: petabytes, more than any address space; the allocation fails at once.
    argv = flags(model, data, tmp_path / "run", tmp_path / "ckpt", 1, "--sglang-max-total-tokens", str(10**13))
    assert main(["train", *argv]) == 1
    err = capsys.readouterr().err
    assert "sluice train: error: out of memory during engine start. Lower one of:" in err
    assert "--sglang-mem-fraction-static (now 0.8)" in err
    assert "--sglang-max-total-tokens (now 10000000000000)" in err
    assert "--sglang-max-running-requests" in err
    assert "torch: " in err and "can't allocate memory" in err


def test_out_of_memory_in_training_names_the_batch_knobs():
    config = parse_config(["--no-use-dynamic-batch-size", "--micro-batch-size", "16", "--rollout-max-response-len",
                           "4096"])
    with pytest.raises(torch.OutOfMemoryError) as error, explain_oom(config, "train"):
        torch.empty(1 << 60, dtype=torch.uint8)  # a real allocation failure (not a mock)
    message = str(error.value)
    assert message.startswith("out of memory during train. Lower one of:")
    assert "--micro-batch-size (now 16)" in message and "--max-tokens-per-gpu" in message
    assert "--train-dtype bfloat16 (now float32)" in message and "--rollout-max-response-len (now 4096)" in message
    assert "--sglang-mem-fraction-static" in message
    assert isinstance(error.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="^unrelated$"), explain_oom(config, "train"):
        raise RuntimeError("unrelated")  # other errors pass through unchanged
    packed = parse_config([])  # the default: packed micro-batches under a derived token budget
    with pytest.raises(torch.OutOfMemoryError) as error, explain_oom(packed, "train"):
        torch.empty(1 << 60, dtype=torch.uint8)
    assert "--max-tokens-per-gpu (now derived from free memory)" in str(error.value)
    assert "--recompute-granularity full (now off)" in str(error.value)


def test_out_of_memory_advice_names_the_offload_flag_that_applies():
    one_process = parse_config([])
    train, rollout = oom_advice(one_process, "train"), oom_advice(one_process, "rollout")
    assert "Or turn on:\n  --offload-rollout (now off): the engines release their KV cache" in train
    assert "Or turn on:\n  --offload-train (now off): the trainer's weights and optimizer state" in rollout
    assert "do not exist" not in train + rollout
    assert "--offload-train" in oom_advice(parse_config(["--offload-rollout"]), "rollout")
    assert "Or turn on" not in oom_advice(parse_config(["--offload-rollout"]), "train")  # already on
    assert "Or turn on" not in oom_advice(parse_config(["--offload"]), "rollout")
    separate_pools = parse_config(["--orchestrator", "ray"])  # pools on their own devices: nothing to free
    assert "Or turn on" not in oom_advice(separate_pools, "train")
    assert "--offload-rollout (now off)" in oom_advice(parse_config(["--orchestrator", "ray", "--colocate"]), "train")
