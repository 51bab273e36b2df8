"""GPU checks (marker `gpu`): skipped only where no CUDA device exists; run them on the GPU machine."""

from __future__ import annotations

import asyncio

import pytest
import torch

from sluice.config import AlgorithmConfig, EngineConfig, TrainConfig
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.observability.metrics import read_metrics
from sluice.trainer.batching import collate
from sluice.trainer.torch_backend import TorchTrainer
from sluice.types import Sample, SamplingParams
from helpers.train_loop import run_loop

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning"),
]


def test_engine_logprobs_match_trainer_on_gpu(lively_checkpoint):
    """bf16 engine on the GPU vs the float32 trainer on the GPU: same tokens scored alike (bf16 tolerance)."""
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cuda", dtype="bfloat16"))
    try:
        prompt = engine.tokenizer.encode("12+34=", add_special_tokens=False)
        request = GenerateRequest(prompt, SamplingParams(temperature=0.8, max_new_tokens=12, seed=3, ignore_eos=True))

        async def generate():
            return await InProcessClient(engine).generate(request)

        result = asyncio.run(generate())
    finally:
        engine.shutdown()
    assert len(result.output_ids) == 12
    trainer = TorchTrainer(lively_checkpoint, TrainConfig(train_device="cuda"), AlgorithmConfig(), temperature=0.8)
    sample = Sample(prompt="", prompt_tokens=prompt, tokens=prompt + result.output_ids, response_length=12)
    batch = collate([sample], [0.0], pad_id=0)
    trainer_logprobs = trainer.compute_logprobs(batch)[0, len(prompt) - 1 :]
    engine_logprobs = torch.tensor(result.output_logprobs)
    assert torch.allclose(trainer_logprobs, engine_logprobs, atol=0.1), (trainer_logprobs, engine_logprobs)


def test_train_loop_on_gpu_raises_reward(tmp_path, small_checkpoint):
    data = tmp_path / "say7.jsonl"
    data.write_text("".join(f'{{"input": "{c}: say 7", "label": "7"}}\n' for c in "abcdefghijkl"))
    argv = [
        "--hf-checkpoint", small_checkpoint, "--prompt-data", str(data), "--label-key", "label",
        "--rollout-batch-size", "8", "--n-samples-per-prompt", "8", "--rollout-max-response-len", "1",
        "--rollout-shuffle", "--num-rollout", "14", "--lr", "3e-2", "--micro-batch-size", "64",
        "--rm-type", "exact", "--train-device", "cuda", "--sglang-device", "cuda", "--run-dir", str(tmp_path / "run"),
        "--no-progress-bar",
    ]
    run_loop(argv)
    rewards = [r["rollout/reward_mean"] for r in read_metrics(tmp_path / "run") if "rollout/reward_mean" in r]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3
