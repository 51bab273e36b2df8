"""The asynchronous loop (--async): the producer keeps generating while the trainer trains, the buffer bounds
staleness, and --partial-rollout aborts groups at a weight update and resumes them on the new weights."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from sluice.buffer import DataBuffer
from sluice.buffer.handle import LocalBufferHandle
from sluice.checkpoint.rollout_data import load_rollout_data
from sluice.config import ConfigError, EngineConfig, parse_config, validate
from sluice.data import PromptSource, load_prompt_samples
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.loops import train
from sluice.models.tokenizer import load_tokenizer
from sluice.observability.metrics import read_metrics
from sluice.orchestration import build_run
from sluice.rollout.generate import GenerateContext
from sluice.rollout.manager import RolloutManager
from sluice.rollout.streaming import StreamingRollout
from sluice.types import Sample, SamplingParams, Status
from helpers.train_process import kill_after_first_checkpoint
from helpers import train_loop
from helpers.train_loop import N_SAMPLES, NUM_ROLLOUT, ROLLOUT_BATCH, SEED, flags

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


def run_loop(argv: list[str]) -> None:
    train_loop.run_loop(argv, loop=train)


def trained_prompts(rollout_dir: Path, num_rollout: int) -> list[str]:
    return [g.samples[0].prompt for i in range(num_rollout)
            for g in load_rollout_data(rollout_dir / f"{i}.json", i)]


@pytest.fixture(scope="module")
def sync_and_async(say7):
    root, model, data = say7
    out = {}
    for name, extra in (("sync", []), ("async", ["--async"]), ("interval2", ["--async", "--update-weights-interval", "2"])):
        rollouts = root / name / "rollouts"
        run_loop(flags(model, data, root / name / "run", root / name / "ckpt", NUM_ROLLOUT,
                       "--save-debug-rollout-data", str(rollouts / "{rollout_id}.json"), *extra))
        out[name] = (read_metrics(root / name / "run" / "metrics.jsonl"), trained_prompts(rollouts, NUM_ROLLOUT))
    return out


def test_async_run_learns_and_overlaps_rollout_with_training(sync_and_async):
    records, _ = sync_and_async["async"]
    rewards = [r["rollout/reward_mean"] for r in records]
    assert len(rewards) == NUM_ROLLOUT
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-3:]) / 3 > 0.9
    # from the second step on, the batch was generated while the previous step trained: one version behind
    assert [r["rollout/staleness_max"] for r in records[1:]] == [1.0] * (NUM_ROLLOUT - 1)
    # the producer runs one batch ahead, never further: no group was generated too early and thrown back
    assert records[-1]["rollout/stale_requeued_groups_total"] == 0
    for record in records:
        assert 0.0 <= record["perf/rollout_idle_frac"] <= 1.0 and 0.0 <= record["perf/train_idle_frac"] <= 1.0
        assert record["perf/step_time_s"] >= record["perf/train_time_s"]


def test_async_trains_the_same_prompts_as_sync_none_lost_or_twice(sync_and_async):
    _, sync_prompts = sync_and_async["sync"]
    for name in ("async", "interval2"):
        _, prompts = sync_and_async[name]
        assert len(prompts) == NUM_ROLLOUT * ROLLOUT_BATCH
        assert Counter(prompts) == Counter(sync_prompts), name


def test_staleness_bound_follows_the_update_interval(sync_and_async):
    records, _ = sync_and_async["interval2"]
    staleness = [r["rollout/staleness_max"] for r in records]
    assert max(staleness) == 2.0 and all(s <= 2.0 for s in staleness)  # the default bound: the interval
    assert sum(records[-1][k] for k in records[-1] if k.startswith("rollout/staleness_frac_")) == pytest.approx(1.0)


def test_async_flags_are_checked(say7, tmp_path):
    root, model, data = say7
    base = flags(model, data, tmp_path / "run", tmp_path / "ckpt", 2)
    for extra, message in (
        (["--partial-rollout"], "--partial-rollout applies to the asynchronous loop: add --async"),
        (["--async", "--max-staleness", "0"], "--max-staleness 0 is below --update-weights-interval 1"),
        (["--async", "--over-sampling-batch-size", "4"], "--over-sampling-batch-size sets the round size"),
        (["--async", "--debug-rollout-only"], "--debug-rollout-only runs the synchronous loop"),
        (["--async", "--mask-offpolicy-in-partial-rollout"], "needs --partial-rollout"),
        (["--async", "--offload"], "--async runs both at once"),
        (["--offload-rollout", "--rollout-num-gpus", "2"], "with separate pools they need --colocate"),
        (["--rollout-num-gpus-per-engine", "2"], "sluice's engine runs on one device"),
        (["--orchestrator", "local", "--actor-num-gpus-per-node", "2"], "use --orchestrator ray"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            validate(parse_config([*base, *extra]))


def test_offload_flags_take_turns_on_the_device(say7, tmp_path):
    """--offload: the engine frees its KV pool while the trainer trains and has it back for the sync and the
    rollout; a short run completes with the engine taking turns."""
    root, model, data = say7
    config = parse_config(flags(model, data, tmp_path / "run", tmp_path / "ckpt", 2, "--offload"))
    validate(config)
    run = build_run(config, log=lambda line: None)
    try:
        run.offload.memory_for("train")
        released = run.engines.engine._released
        run.offload.memory_for("sync")
        assert released and not run.engines.engine._released
        train(run)
        assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2
    finally:
        run.close()


def test_async_run_killed_and_resumed_trains_every_prompt_once(say7, tmp_path):
    """SIGKILL an --async run after its first checkpoint and relaunch it: the groups in flight or finished at the
    save come back from the buffer's state, so over the whole run every prompt of the data order is trained once
    and no sample twice."""
    root, model, data = say7
    save, rollouts = tmp_path / "ckpt", tmp_path / "rollouts"
    argv = flags(model, data, tmp_path / "run", save, NUM_ROLLOUT, "--async", "--save-interval", "3", "--load",
                 str(save), "--save-debug-rollout-data", str(rollouts / "{rollout_id}.json"))
    killed_at = kill_after_first_checkpoint(argv, save)
    run_loop(argv)
    assert int(killed_at.split("_")[1]) + 1 < NUM_ROLLOUT  # the relaunch had steps left to run
    groups = [g for i in range(NUM_ROLLOUT) for g in load_rollout_data(rollouts / f"{i}.json", i)]
    config = parse_config(argv)
    samples, _ = load_prompt_samples(str(data), config.data, load_tokenizer(model))
    expected = [s.prompt for s in PromptSource(samples, shuffle=True, seed=SEED).next_batch(NUM_ROLLOUT * ROLLOUT_BATCH)]
    assert Counter(g.samples[0].prompt for g in groups) == Counter(expected)
    indices = [s.index for g in groups for s in g.samples]
    assert len(indices) == len(set(indices)) == NUM_ROLLOUT * ROLLOUT_BATCH * N_SAMPLES
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, NUM_ROLLOUT + 1))


# ---- the producer against a real engine: a weight update lands while a group is generating ----------------------

MAX_NEW = 160


async def zero_reward(sample: Sample) -> float:
    return 0.0


@pytest.mark.parametrize("partial", [True, False])
def test_weight_update_mid_generation(lively_checkpoint, lively_checkpoint_other, partial):
    """With --partial-rollout the update aborts the group, which is requeued and resumed on the new weights up to
    the same total length, its old tokens masked; without it the requests live through the update. Either way
    every token is tagged with the weights that sampled it, and the group's policy version is the older one."""
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32"))
    try:
        tokenizer = load_tokenizer(lively_checkpoint)
        prompt = Sample(prompt="abc", prompt_tokens=tokenizer.encode("abc"))
        buffer = DataBuffer(PromptSource([prompt], shuffle=False, seed=0), n_samples_per_prompt=2, max_staleness=1,
                            max_held_groups=1)
        manager = RolloutManager(GenerateContext(InProcessClient(engine), tokenizer), reward_fn=zero_reward)
        params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, ignore_eos=True)

        async def scenario():
            producer = StreamingRollout(manager, LocalBufferHandle(buffer), params, groups_to_train=1,
                                        partial_rollout=partial, mask_offpolicy=partial)
            producer.start()
            while engine.stats.num_decode_tokens < 20:  # both samples are generating
                await asyncio.sleep(0.01)

            async def update():
                await asyncio.to_thread(engine.update_weights, lively_checkpoint_other, 1)
                buffer.set_weight_version(1)

            await producer.around_update(update())
            groups = await producer.take(1, trainer_version=1)
            await producer.stop()
            return groups, producer.counts

        groups, counts = asyncio.run(scenario())
        assert counts["requeued"] == (1 if partial else 0)
        for sample in groups[0].samples:
            assert sample.status == Status.TRUNCATED and sample.response_length == MAX_NEW
            assert len(sample.rollout_log_probs) == len(sample.loss_mask) == MAX_NEW
            assert sample.weight_versions == [0, 1] and sample.policy_version == 0
            if partial:  # the tokens of the old weights are context now, not trained
                num_old = sample.loss_mask.index(1)
                assert 0 < num_old < MAX_NEW and set(sample.loss_mask[num_old:]) == {1}
                # the resumed part is what the new weights generate greedily after the old part
                context = sample.tokens[: len(sample.prompt_tokens) + num_old]
                again = asyncio.run(InProcessClient(engine).generate(GenerateRequest(
                    context, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW - num_old, ignore_eos=True))))
                assert again.output_ids == sample.tokens[len(context):]
            else:
                assert sample.loss_mask == [1] * MAX_NEW
    finally:
        engine.shutdown()
