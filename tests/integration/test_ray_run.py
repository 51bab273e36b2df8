"""The distributed path on real Ray, on CPU: engine actors behind their HTTP servers, trainer actors training
data-parallel over gloo, the Data Buffer as an actor; weights broadcast by rank 0; a killed engine restarted."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest
import ray

from sluice.checkpoint.rollout_data import load_rollout_data
from sluice.config import parse_config, validate
from sluice.data import PromptSource, load_prompt_samples
from sluice.loops import train
from sluice.observability.metrics import read_metrics
from sluice.orchestration import build_run, ray_pools
from sluice.orchestration.ray_placement import RayPlacement
from sluice.orchestration.ray_pools import RayEnginePool
from sluice.orchestration.run import Run
from sluice.sync.verify import checksum_differences, engine_checksums
from sluice.trainer.update import update_policy
from helpers.train_loop import SEED, flags

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")
NUM_ROLLOUT = 10
# The async run: sampling on two engines depends on timing, and a start without a single "7" gives GRPO no
# signal for a few steps (seen: rewards near 0 up to step 8, then ~1 by step 12); 16 steps leave room for that.
ASYNC_ROLLOUTS = 16
BATCH = 8  # test_train_loop's --rollout-batch-size


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)  # CPU bundles on any machine
    yield
    ray.shutdown()


def expected_prompts(run: Run, data: Path, num: int) -> list[str]:
    """The first ``num`` prompts the run's data order hands out (shuffled per epoch, seeded)."""
    samples, _ = load_prompt_samples(str(data), run.config.data, run.tokenizer)
    return [s.prompt for s in PromptSource(samples, shuffle=True, seed=SEED).next_batch(num)]


def trained_prompts(rollouts: Path, num_rollout: int = NUM_ROLLOUT) -> list[str]:
    return [g.samples[0].prompt for i in range(num_rollout) for g in load_rollout_data(rollouts / f"{i}.json", i)]


def test_async_run_on_ray_actors(ray_cluster, say7):
    """1 trainer actor, 2 engine actors, the buffer actor: the async run learns, stays within the staleness bound,
    trains every prompt once, and after the last sync both engines hold exactly the trainer's weights."""
    root, model, data = say7
    rollouts = root / "async" / "rollouts"
    argv = flags(model, data, root / "async" / "run", root / "async" / "ckpt", ASYNC_ROLLOUTS, "--orchestrator", "ray",
                 "--async", "--rollout-num-gpus", "2", "--save-debug-rollout-data", str(rollouts / "{rollout_id}.json"))
    config = parse_config(argv)
    validate(config)
    run = build_run(config, log=lambda line: None)
    assert isinstance(run.engines, RayEnginePool) and len(run.engines.actors) == 2
    try:
        train(run)
        trainer_sums = run.trainer.weight_checksums()
        engines = [asyncio.run(engine_checksums(url, api_key=run.engines.api_key)) for url in run.engines.urls]
        prompts = expected_prompts(run, data, ASYNC_ROLLOUTS * BATCH)
        routed = run.engines.client.num_routed
        key = run.engines.api_key  # generated for this run: none was given
        unkeyed = [httpx.post(url + path, json=body, timeout=30).status_code for url in run.engines.urls
                   for path, body in (("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}),
                                      ("/update_weights_from_disk", {"model_path": str(model)}))]
    finally:
        run.close()
    assert key and len(key) >= 40 and unkeyed == [401] * 4
    assert not [path for path in (root / "async").rglob("*") if path.is_file() and key.encode() in path.read_bytes()]
    for version, sums in engines:
        assert version == ASYNC_ROLLOUTS and checksum_differences(trainer_sums, sums) == []
    assert min(routed) > 0  # both engines generated
    records = read_metrics(root / "async" / "run" / "metrics.jsonl")
    rewards = [r["rollout/reward_mean"] for r in records]
    # it learns: every step but the first trains on groups one version behind, so it lags the sync run by a step
    assert sum(rewards[:2]) / 2 < 0.2 and sum(rewards[-2:]) / 2 - sum(rewards[:2]) / 2 > 0.5
    assert max(r["rollout/staleness_max"] for r in records) == 1.0
    assert all(r["sync/bytes"] > 0 for r in records)
    assert Counter(trained_prompts(rollouts, ASYNC_ROLLOUTS)) == Counter(prompts)


def test_a_killed_engine_is_restarted_and_nothing_is_lost(ray_cluster, say7, tmp_path, monkeypatch):
    """SIGKILL the only engine while a rollout is generating: its groups go back to the buffer, the engine actor
    is restarted and re-synced, and the run trains every prompt exactly once."""
    root, model, data = say7
    plugin = tmp_path / "killer.py"
    plugin.write_text(
        "import os, signal\n"
        "from sluice.rollout.generate import generate_single_turn\n"
        "VICTIM = {'pid': None}\n"
        "async def generate(sample, sampling_params, ctx):\n"
        "    if VICTIM['pid'] is not None and sample.index == 2 * 8 * 8 + 3:  # a sample of rollout 2\n"
        "        os.kill(VICTIM['pid'], signal.SIGKILL)\n"
        "        VICTIM['pid'] = None\n"
        "    return await generate_single_turn(sample, sampling_params, ctx)\n"
        "generate.resumes_partial = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import killer

    rollouts = tmp_path / "rollouts"
    argv = flags(model, data, tmp_path / "run", tmp_path / "ckpt", NUM_ROLLOUT, "--orchestrator", "ray",
                 "--custom-generate-function-path", "killer.generate",
                 "--save-debug-rollout-data", str(rollouts / "{rollout_id}.json"))
    config = parse_config(argv)
    validate(config)
    run = build_run(config, log=lambda line: None)
    try:
        killer.VICTIM["pid"] = ray.get(run.engines.actors[0].pid.remote())
        train(run)
        restarts = run.weights.num_engine_restarts
        prompts = expected_prompts(run, data, NUM_ROLLOUT * BATCH)
        version, sums = asyncio.run(engine_checksums(run.engines.urls[0], api_key=run.engines.api_key))
        trainer_sums = run.trainer.weight_checksums()
        # a hung engine (alive, answering pings, generating nothing) is found by the probe and replaced too
        hung_url = run.engines.urls[0]
        ray.get(run.engines.actors[0].pause.remote())
        monkeypatch.setattr(ray_pools, "ENGINE_PROBE_TIMEOUT_S", 3.0)
        asyncio.run(run.weights.recover_engines())
        hung_restarts = run.weights.num_engine_restarts - restarts
        after_hang = asyncio.run(engine_checksums(run.engines.urls[0], api_key=run.engines.api_key))
        replaced = run.engines.urls[0] != hung_url
    finally:
        run.close()
    assert hung_restarts == 1 and replaced
    assert after_hang[0] == NUM_ROLLOUT and checksum_differences(trainer_sums, after_hang[1]) == []
    assert killer.VICTIM["pid"] is None and restarts == 1
    assert Counter(trained_prompts(rollouts)) == Counter(prompts)
    indices = [s.index for i in range(NUM_ROLLOUT) for g in load_rollout_data(rollouts / f"{i}.json", i)
               for s in g.samples]
    assert len(indices) == len(set(indices)) == NUM_ROLLOUT * BATCH * 8
    assert version == NUM_ROLLOUT and checksum_differences(trainer_sums, sums) == []  # the new engine was synced


def test_two_trainer_actors_train_like_one(ray_cluster, say7, tmp_path):
    """A train pool of 2 actors (gloo) and one trainer in this process, one optimizer step on the same rollout
    (22 micro-batches, split 11/11): the same loss and gradient norm. (Weights after the step are compared in
    test_data_parallel.py; with --lr 3e-2 Adam's first step is nearly sign(grad), which magnifies float noise.)"""
    root, model, data = say7
    argv = flags(model, data, tmp_path / "run", tmp_path / "ckpt", 1, "--global-batch-size", "64",
                 "--micro-batch-size", "3", "--actor-num-gpus-per-node", "2", "--orchestrator", "ray")
    config = parse_config(argv)
    validate(config)
    local = build_run(parse_config([*argv[:-2], "--orchestrator", "local", "--actor-num-gpus-per-node", "1"]),
                      log=lambda line: None)
    try:
        for rollout_id in range(5):  # the first rollout with a reward spread (seeded sampling: the same each run)
            batch = local.batches.generate(rollout_id)
            if len({float(r) for group in batch.rewards for r in group}) > 1:
                break
        groups, rewards = batch.groups, batch.rewards
        expected = update_policy(local.trainer.backend, groups, config.algorithm, rewards, config.global_batch_size,
                                 local.tokenizer.pad_token_id or 0, config.rollout.rollout_max_response_len)
    finally:
        local.close()
    placement = RayPlacement(config, log=lambda line: None)
    try:
        pool = placement.start_trainer(None, None, local.tokenizer.pad_token_id or 0)
        assert len(pool.actors) == 2
        got = pool.train(groups, rewards, True)
    finally:
        placement.shutdown()
    assert expected["train/grad_norm"] > 0
    for key in ("train/loss", "train/grad_norm", "train/entropy"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


def test_sft_with_an_eval_set_on_ray_evaluates_on_an_engine_actor(ray_cluster, say7_sft, tmp_path):
    """SFT from data with an eval set on Ray: a trainer actor and an engine actor (for the eval alone); rank 0
    broadcasts the weights before each eval, and the engine ends holding the trainer's weights at version 6. The
    trainer actor also scores held-out SFT rows (--eval-sft-data) at each eval."""
    model, rows, eval_set = say7_sft
    argv = ["--hf-checkpoint", str(model), "--prompt-data", str(rows), "--rollout-function-path", "sft",
            "--loss-type", "sft_loss", "--response-key", "answer.text", "--apply-chat-template",
            "--rollout-batch-size", "8", "--num-rollout", "6", "--lr", "3e-2", "--micro-batch-size", "8",
            "--seed", "0", "--train-device", "cpu", "--sglang-device", "cpu", "--run-dir", str(tmp_path / "run"),
            "--no-progress-bar", "--eval-prompt-data", "say7", str(eval_set), "--eval-interval", "3",
            "--eval-temperature", "0", "--eval-max-response-len", "1", "--rm-type", "exact", "--label-key", "label",
            "--orchestrator", "ray", "--rollout-num-gpus", "1", "--eval-sft-data", "seen", str(rows)]
    config = parse_config(argv)
    validate(config)
    run = build_run(config, log=lambda line: None)
    assert isinstance(run.engines, RayEnginePool) and len(run.engines.actors) == 1
    try:
        train(run)
        trainer_sums = run.trainer.weight_checksums()
        version, sums = asyncio.run(engine_checksums(run.engines.urls[0], api_key=run.engines.api_key))
    finally:
        run.close()
    assert version == 6 and checksum_differences(trainer_sums, sums) == []
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    accuracy = {r["step"]: r["eval/say7/accuracy"] for r in records if "eval/say7/accuracy" in r}
    assert list(accuracy) == [0, 3, 6] and accuracy[0] == 0.0 and accuracy[6] == 1.0, accuracy
    assert [r["step"] for r in records if "sync/bytes" in r] == [3, 6]
    losses = [r["eval/seen/sft_loss"] for r in records if "eval/seen/sft_loss" in r]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]
