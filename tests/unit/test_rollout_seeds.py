"""Request seeds (rollout/seeds.py) and what they buy on the CPU engine: a partial rollout continued after an
abort draws the tokens of the uninterrupted request, a group's samples differ, a rollout repeats, and a seeded
request draws the same tokens whatever other requests share its batches."""

from __future__ import annotations

import asyncio
import copy
import dataclasses

import pytest

from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import GenerateRequest
from sluice.rollout.generate import GenerateContext, generate_single_turn
from sluice.rollout.manager import RolloutManager
from sluice.rollout.seeds import RolloutSeeds, derive_seed, turn_seed
from sluice.types import Sample, SamplingParams, Status

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)


def one(sample: Sample) -> float:
    return 1.0


def prompt_sample(engine, text: str = "reverse 12345 please", index: int = 0) -> Sample:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return Sample(prompt=text, prompt_tokens=ids, tokens=list(ids), index=index)


# --------------------------------------------------------------------------------------------- derivation
def test_seeds_are_pure_functions_of_stream_index_and_turn():
    seeds = RolloutSeeds(42)
    assert seeds.params_for(SAMPLING, 3).seed == seeds.params_for(SAMPLING, 3).seed == derive_seed(42, "train", 3)
    assert derive_seed(42, "train", 3) == 4004993037752336081  # pinned: a new derivation changes every run's samples
    assert len({seeds.params_for(SAMPLING, i).seed for i in range(100)}) == 100
    assert seeds.within("eval/gsm8k").params_for(SAMPLING, 3).seed != seeds.params_for(SAMPLING, 3).seed
    assert RolloutSeeds(43).params_for(SAMPLING, 3).seed != seeds.params_for(SAMPLING, 3).seed
    assert all(0 <= seeds.params_for(SAMPLING, i).seed < 2**63 for i in range(100))
    assert SAMPLING.seed is None  # params are copied, not changed


def test_a_seed_already_in_the_params_is_the_base_and_turns_get_their_own():
    own = dataclasses.replace(SAMPLING, seed=7)
    seeds = RolloutSeeds(42)
    assert seeds.params_for(own, 3).seed == derive_seed(7, "train", 3)
    assert seeds.params_for(own, 3).seed != seeds.params_for(own, 4).seed  # a group's samples still differ
    assert turn_seed(99, 0) == 99 and turn_seed(None, 2) is None
    assert len({turn_seed(99, t) for t in range(5)}) == 5


# ------------------------------------------------------------------------------------ on the CPU engine
def test_a_partial_rollout_continued_after_an_abort_draws_the_uninterrupted_tokens(engine):
    """Abort a seeded request part-way (a real abort, at whatever token it has reached), continue the sample
    through generate_single_turn: the tokens of one uninterrupted request with that seed."""
    client = InProcessClient(engine)
    ctx = GenerateContext(client, engine.tokenizer)
    params = dataclasses.replace(SAMPLING, seed=1234)

    async def interrupted() -> tuple[Sample, int]:
        sample = prompt_sample(engine)
        task = asyncio.ensure_future(generate_single_turn(sample, params, ctx))
        while not engine.load()["num_running"]:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        await client.abort()
        await task
        assert sample.status == Status.ABORTED
        reached = sample.response_length
        return await generate_single_turn(sample, params, ctx), reached

    straight = asyncio.run(generate_single_turn(prompt_sample(engine), params, ctx))
    for _ in range(3):
        continued, reached = asyncio.run(interrupted())
        if 0 < reached < 16:
            break
    assert 0 < reached < 16, "the abort never landed mid-response"
    assert continued.tokens == straight.tokens and continued.response_length == 16
    assert continued.rollout_log_probs == pytest.approx(straight.rollout_log_probs, abs=1e-4)
    # the same split by length, at every cut: the continuation's noise depends on the position only
    for cut in (1, 7, 15):
        head = asyncio.run(generate_single_turn(prompt_sample(engine), dataclasses.replace(params, max_new_tokens=cut),
                                                ctx))
        head.status = Status.ABORTED
        assert asyncio.run(generate_single_turn(head, params, ctx)).tokens == straight.tokens, cut


def test_a_seeded_rollout_repeats_and_its_samples_differ(engine):
    manager = RolloutManager(GenerateContext(InProcessClient(engine), engine.tokenizer), one, seeds=RolloutSeeds(5))
    prompts = [prompt_sample(engine, text) for text in ("hi", "what is 2+2?", "reverse 12345 please")]

    def rollout() -> list[list[list[int]]]:
        groups = asyncio.run(manager.generate_groups(copy.deepcopy(prompts), 4, SAMPLING))
        return [[s.tokens for s in g.samples] for g in groups]

    first, second = rollout(), rollout()
    assert first == second
    assert all(len({tuple(t) for t in group}) == 4 for group in first)
    other = asyncio.run(manager.seeded_as("eval/x").generate_groups(copy.deepcopy(prompts), 4, SAMPLING))
    assert [[s.tokens for s in g.samples] for g in other] != first


def test_a_generate_function_that_sets_its_own_seed_keeps_it(engine):
    client = InProcessClient(engine)

    async def own_seed(sample: Sample, sampling_params: SamplingParams, ctx: GenerateContext) -> Sample:
        return await generate_single_turn(sample, dataclasses.replace(sampling_params, seed=77), ctx)

    manager = RolloutManager(GenerateContext(client, engine.tokenizer), one, generate_fn=own_seed,
                             seeds=RolloutSeeds(5))
    groups = asyncio.run(manager.generate_groups([prompt_sample(engine)], 2, SAMPLING))
    direct = asyncio.run(client.generate(GenerateRequest(prompt_sample(engine).prompt_tokens,
                                                         dataclasses.replace(SAMPLING, seed=77))))
    assert [s.response_length for s in groups[0].samples] == [16, 16]
    assert all(s.tokens[-16:] == direct.output_ids for s in groups[0].samples)


def test_seeded_requests_draw_the_same_tokens_alone_and_in_a_crowd(engine):
    """CPU matmuls round a row differently with the number of rows (measured: logprobs move by ~1e-6), so float
    results are not batch-invariant; the tokens still agree here, since a draw flips only when two tokens'
    noisy scores tie to within that rounding."""
    client = InProcessClient(engine)
    texts = ["hi", "what is 2+2?", "reverse 12345 please", "add 3 and 4 then 5", "x", "tell me a story about a cat"]
    prompts = [engine.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def request(i: int) -> GenerateRequest:
        return GenerateRequest(prompts[i], dataclasses.replace(SAMPLING, seed=100 + i), return_logprob=True)

    async def staggered(i: int):
        await asyncio.sleep(0.003 * i)  # join the running batch at another step each
        return await client.generate(request(i))

    async def crowd():
        return await asyncio.gather(*(staggered(i) for i in range(len(prompts))))

    alone = [asyncio.run(client.generate(request(i))) for i in range(len(prompts))]
    together = asyncio.run(crowd())
    for a, b in zip(alone, together):
        assert a.output_ids == b.output_ids
        assert a.output_logprobs == pytest.approx(b.output_logprobs, abs=1e-4)


def test_a_seed_that_is_not_an_int_is_refused_at_submit(engine):
    client = InProcessClient(engine)
    for seed in (3.5, "7", True):
        request = GenerateRequest([5, 6, 7], dataclasses.replace(SAMPLING, seed=seed))
        with pytest.raises(ValueError, match="sampling_params.seed must be an int or None; got"):
            asyncio.run(client.generate(request))
    assert asyncio.run(client.generate(GenerateRequest([5, 6, 7], dataclasses.replace(SAMPLING, seed=2**70)))).output_ids
