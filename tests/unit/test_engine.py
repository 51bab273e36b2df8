"""LocalEngine through InProcessClient on a real tiny model (CPU), checked against plain HF forwards;
and the sampler's truncation rules on hand-made logits."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.config import EngineConfig
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import FinishReason, GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.engine.sampler import noise_key, sample_tokens, seeded_noise
from sluice.types import SamplingParams

from helpers.reference import hf_greedy, hf_logprobs

# The engine passes `past_key_values`, which newer transformers rename; the engine silences the notice at import,
# but pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

EOS = 2  # <|im_end|> of the demo tokenizer
PROMPTS = ["hi", "what is 2+2?", "reverse 12345 please", "<|im_start|>user\nadd 3 and 4<|im_end|>\n"]


@pytest.fixture(scope="module")
def client(engine) -> InProcessClient:
    return InProcessClient(engine)


@pytest.fixture(scope="module")
def hf_model(lively_checkpoint):
    return AutoModelForCausalLM.from_pretrained(lively_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(engine) -> list[list[int]]:
    ids = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    assert len({len(p) for p in ids}) == len(ids)  # all lengths differ: the batch needs left padding
    return ids


# ------------------------------------------------------------------------------------------- references
def run(coro):
    return asyncio.run(coro)


async def generate_together(client: InProcessClient, requests: list[GenerateRequest]):
    """Submit every request while the engine is paused, so they are decoded as one batch."""
    await client.pause()
    tasks = [asyncio.ensure_future(client.generate(r)) for r in requests]
    await asyncio.sleep(0)  # each task runs up to its await: its request is in the engine's queue
    await client.resume()
    return await asyncio.gather(*tasks)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, **kw)


def first_index(tokens: list[int], value: int) -> int | None:
    return tokens.index(value) if value in tokens else None


# ---------------------------------------------------------------------------------------------- greedy
def test_batched_greedy_matches_hf_greedy_loop(client, hf_model, prompt_ids):
    requests = [GenerateRequest(p, greedy(10, ignore_eos=True)) for p in prompt_ids]
    results = run(generate_together(client, requests))
    for prompt, request, result in zip(prompt_ids, requests, results):
        expected = hf_greedy(hf_model, prompt, 10)
        assert result.output_ids == expected
        assert result.rid == request.rid
        assert result.finish_reason == FinishReason.LENGTH
        assert result.prompt_tokens == len(prompt)
        # greedy logprobs are taken at temperature 1
        assert result.output_logprobs == pytest.approx(hf_logprobs(hf_model, prompt, expected), abs=1e-4)
    # the test means something: the outputs differ between prompts and are not just a repeated token
    assert len({tuple(r.output_ids) for r in results}) == len(results)
    assert all(len(set(r.output_ids)) > 2 for r in results)


def test_sampled_logprobs_match_hf_forward_at_temperature(client, hf_model, prompt_ids):
    requests = [GenerateRequest(p, SamplingParams(temperature=0.8, max_new_tokens=8, ignore_eos=True, seed=i))
                for i, p in enumerate(prompt_ids)]
    results = run(generate_together(client, requests))
    for prompt, result in zip(prompt_ids, results):
        assert len(result.output_ids) == len(result.output_logprobs) == 8
        expected = hf_logprobs(hf_model, prompt, result.output_ids, temperature=0.8)
        assert result.output_logprobs == pytest.approx(expected, abs=1e-4)
    # sampling, not greedy: at least one sequence leaves the greedy path
    assert any(r.output_ids != hf_greedy(hf_model, p, 8) for p, r in zip(prompt_ids, results))


def test_return_logprob_false_returns_no_logprobs(client, prompt_ids):
    result = run(client.generate(GenerateRequest(prompt_ids[0], greedy(3, ignore_eos=True), return_logprob=False)))
    assert len(result.output_ids) == 3 and result.output_logprobs == []


# -------------------------------------------------------------------------------------------- seeds
def test_per_request_seed_is_reproducible_alone_and_in_a_batch(client, prompt_ids):
    def params(seed):
        return SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True, seed=seed)

    alone = run(client.generate(GenerateRequest(prompt_ids[2], params(11))))
    batch = run(generate_together(client, [
        GenerateRequest(prompt_ids[0], params(12)),
        GenerateRequest(prompt_ids[2], params(11)),
        GenerateRequest(prompt_ids[1], params(None)),
        GenerateRequest(prompt_ids[3], params(11)),
        GenerateRequest(prompt_ids[2], params(11)),
    ]))
    assert batch[1].output_ids == alone.output_ids
    assert batch[4].output_ids == alone.output_ids
    assert batch[1].output_logprobs == pytest.approx(alone.output_logprobs, abs=1e-5)
    other_seed = run(client.generate(GenerateRequest(prompt_ids[2], params(12))))
    assert other_seed.output_ids != alone.output_ids


def test_top_k_1_sampling_equals_greedy(client, hf_model, prompt_ids):
    prompt = prompt_ids[2]
    expected = hf_greedy(hf_model, prompt, 8)
    for temperature, seed in ((1.0, 3), (0.8, None)):
        params = SamplingParams(temperature=temperature, top_k=1, max_new_tokens=8, ignore_eos=True, seed=seed)
        result = run(client.generate(GenerateRequest(prompt, params)))
        assert result.output_ids == expected
        # logprobs stay those of the untruncated tempered distribution
        assert result.output_logprobs == pytest.approx(hf_logprobs(hf_model, prompt, expected, temperature), abs=1e-4)


# ----------------------------------------------------------------------------------- finish reasons
def test_max_new_tokens_gives_length_with_exactly_that_many_tokens(client, hf_model, prompt_ids):
    prompt = prompt_ids[2]
    reference = hf_greedy(hf_model, prompt, 6)
    assert EOS not in reference  # precondition: the greedy path does not stop on its own this early
    for n in (1, 6):
        result = run(client.generate(GenerateRequest(prompt, greedy(n))))
        assert result.finish_reason == FinishReason.LENGTH
        assert result.output_ids == reference[:n]
        assert len(result.output_logprobs) == n
        assert result.matched_stop is None


def test_eos_stops_unless_ignore_eos(client, engine, hf_model, prompt_ids):
    prompt = prompt_ids[0]
    reference = hf_greedy(hf_model, prompt, 16)
    eos_at = first_index(reference, EOS)
    assert eos_at is not None and eos_at >= 1  # precondition of this fixture model: greedy emits EOS after a token

    stopped = run(client.generate(GenerateRequest(prompt, greedy(16))))
    assert stopped.finish_reason == FinishReason.STOP
    assert stopped.matched_stop == EOS
    assert stopped.output_ids == reference[: eos_at + 1]  # the EOS token is part of the output ...
    assert stopped.text == engine.tokenizer.decode(reference[:eos_at])  # ... but not of the text
    assert "<|im_end|>" not in stopped.text

    ignored = run(client.generate(GenerateRequest(prompt, greedy(eos_at + 3, ignore_eos=True))))
    assert ignored.finish_reason == FinishReason.LENGTH
    assert ignored.output_ids == reference[: eos_at + 3]
    assert ignored.output_ids[eos_at] == EOS


def test_stop_token_ids(client, hf_model, prompt_ids):
    prompt = prompt_ids[2]
    reference = hf_greedy(hf_model, prompt, 8)
    k = next(i for i in range(2, 8) if reference[i] not in reference[:i])  # first occurrence at position k
    result = run(client.generate(GenerateRequest(prompt, greedy(8, stop_token_ids=[reference[k]]))))
    assert result.finish_reason == FinishReason.STOP
    assert result.matched_stop == reference[k]
    assert result.output_ids == reference[: k + 1]
    assert len(result.output_logprobs) == k + 1


def test_stop_strings_trim_the_text_and_keep_the_tokens(client, engine, hf_model, prompt_ids):
    prompt = prompt_ids[2]
    reference = hf_greedy(hf_model, prompt, 10)
    assert all(t > EOS for t in reference)  # precondition: one character per token, no special tokens
    text = engine.tokenizer.decode(reference)
    assert len(text) == len(reference)
    k = next(i for i in range(2, 8) if text.find(text[i : i + 2]) == i)  # a 2-char string first seen at k
    stop, later = text[k : k + 2], text[k + 1 : k + 3]
    result = run(client.generate(GenerateRequest(prompt, greedy(10, stop=[later, stop]))))
    assert result.finish_reason == FinishReason.STOP
    assert result.matched_stop == stop  # the earliest match wins, not the first in the list
    assert result.text == text[:k]
    assert result.output_ids == reference[: k + 2]  # the stop string's tokens stay in output_ids


# --------------------------------------------------------------------------------------------- abort
def test_abort_one_request_of_a_batch(client, prompt_ids):
    async def scenario():
        await client.pause()
        keep = asyncio.ensure_future(client.generate(GenerateRequest(prompt_ids[0], greedy(4, ignore_eos=True))))
        long = GenerateRequest(prompt_ids[1], greedy(400, ignore_eos=True), rid="long-one")
        doomed = asyncio.ensure_future(client.generate(long))
        await asyncio.sleep(0)
        await client.abort("long-one")
        await client.resume()
        return await keep, await doomed

    kept, aborted = run(scenario())
    assert aborted.rid == "long-one"
    assert aborted.finish_reason == FinishReason.ABORT
    assert aborted.output_ids == [] and aborted.output_logprobs == []  # aborted before its first step
    assert kept.finish_reason == FinishReason.LENGTH and len(kept.output_ids) == 4
    # the engine serves new requests normally afterwards
    after = run(client.generate(GenerateRequest(prompt_ids[1], greedy(3, ignore_eos=True))))
    assert after.finish_reason == FinishReason.LENGTH and len(after.output_ids) == 3


def test_abort_mid_generation_returns_the_partial_output(client, prompt_ids):
    params = SamplingParams(temperature=1.0, max_new_tokens=400, ignore_eos=True, seed=5)

    async def scenario():
        task = asyncio.ensure_future(client.generate(GenerateRequest(prompt_ids[3], params, rid="runner")))
        await asyncio.sleep(0.05)  # let it decode a few tokens (any number, 0 included, keeps the test valid)
        await client.pause()  # takes effect between two decode steps
        await client.abort("runner")
        await client.resume()
        return await task

    partial = run(scenario())
    assert partial.finish_reason == FinishReason.ABORT
    assert len(partial.output_ids) == len(partial.output_logprobs) < 400
    if partial.output_ids:  # the partial output is exactly the prefix the same seed generates
        n = len(partial.output_ids)
        full = run(client.generate(GenerateRequest(prompt_ids[3], SamplingParams(
            temperature=1.0, max_new_tokens=n, ignore_eos=True, seed=5))))
        assert full.output_ids == partial.output_ids
        assert full.output_logprobs == pytest.approx(partial.output_logprobs, abs=1e-5)


def test_abort_all_aborts_submitted_requests_only(client, prompt_ids):
    async def scenario():
        await client.pause()
        tasks = [asyncio.ensure_future(client.generate(GenerateRequest(p, greedy(50, ignore_eos=True))))
                 for p in prompt_ids[:2]]
        await asyncio.sleep(0)
        await client.abort()
        await client.resume()
        return await asyncio.gather(*tasks)

    results = run(scenario())
    assert [r.finish_reason for r in results] == [FinishReason.ABORT, FinishReason.ABORT]
    # An abort with nothing in flight must not poison requests submitted after it.
    run(client.abort())
    run(client.abort("reused-rid"))
    later = run(client.generate(GenerateRequest(prompt_ids[0], greedy(3, ignore_eos=True), rid="reused-rid")))
    assert later.finish_reason == FinishReason.LENGTH and len(later.output_ids) == 3


# ---------------------------------------------------------------------------------------- weight update
def test_update_weights_changes_outputs_and_version(lively_checkpoint, lively_checkpoint_other):
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32"))
    client = InProcessClient(engine)
    try:
        other = AutoModelForCausalLM.from_pretrained(lively_checkpoint_other, dtype=torch.float32).eval()
        prompt = engine.tokenizer.encode(PROMPTS[2], add_special_tokens=False)
        before = run(client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True))))
        assert before.weight_version == 0

        named = {name: t.clone() for name, t in other.state_dict().items()}
        run(client.update_weights(named, version=7))
        assert run(client.weight_version()) == 7
        after = run(client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True))))
        assert after.weight_version == 7
        assert after.output_ids != before.output_ids
        assert after.output_ids == hf_greedy(other, prompt, 8)

        with pytest.raises(KeyError, match="no_such_weight"):
            run(client.update_weights({"no_such_weight": torch.zeros(3)}, version=8))
        with pytest.raises(ValueError, match="shape"):
            run(client.update_weights({"model.norm.weight": torch.zeros(5)}, version=8))
        assert run(client.weight_version()) == 7  # a failed update does not bump the version
        unchanged = run(client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True))))
        assert unchanged.output_ids == after.output_ids

        # from a checkpoint directory (safetensors), back to the original weights
        run(client.update_weights(lively_checkpoint, version=9))
        restored = run(client.generate(GenerateRequest(prompt, greedy(8, ignore_eos=True))))
        assert restored.output_ids == before.output_ids and restored.weight_version == 9
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------------------------- sampler
PROBS = [0.5, 0.3, 0.1, 0.06, 0.04]
LOGITS = torch.tensor([math.log(p) for p in PROBS])


def draw(params: SamplingParams, num: int = 2000, seed: int = 0) -> tuple[torch.Tensor, set[float]]:
    """``num`` draws (one batch of ``num`` identical rows, seeded global RNG) from the hand-made distribution;
    returns the token frequencies and the set of logprobs reported."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokens, logprobs = sample_tokens(LOGITS[None, :].repeat(num, 1), [params] * num, [0] * num)
    freq = torch.bincount(tokens, minlength=len(PROBS)).float() / num
    return freq, {round(v, 5) for v in logprobs.tolist()}


@pytest.mark.parametrize("params, kept", [
    (SamplingParams(top_p=0.75), [0, 1]),  # mass before token 2 is 0.8 >= 0.75
    (SamplingParams(top_p=0.85), [0, 1, 2]),  # mass before token 3 is 0.9 >= 0.85
    (SamplingParams(top_k=3), [0, 1, 2]),
    (SamplingParams(min_p=0.25), [0, 1]),  # keep p >= 0.25 * 0.5
    (SamplingParams(min_p=0.15), [0, 1, 2]),  # keep p >= 0.075
    (SamplingParams(top_k=4, top_p=0.75), [0, 1]),  # the strictest rule wins
    (SamplingParams(top_p=1e-6), [0]),  # the most likely token always survives
], ids=["top_p_0.75", "top_p_0.85", "top_k_3", "min_p_0.25", "min_p_0.15", "top_k_and_top_p", "top_p_tiny"])
def test_sampler_truncation_never_draws_outside_and_renormalises(params, kept):
    freq, logprobs = draw(params)
    outside = [i for i in range(len(PROBS)) if i not in kept]
    assert freq[outside].sum().item() == 0.0
    mass = sum(PROBS[i] for i in kept)
    for i in kept:  # renormalised over the kept tokens
        assert freq[i].item() == pytest.approx(PROBS[i] / mass, abs=0.05)
    # reported logprobs are those before truncation (what the trainer recomputes)
    assert logprobs == {round(math.log(PROBS[i]), 5) for i in kept}


def test_sampler_without_truncation_reaches_every_token_and_temperature_scales_logprobs():
    freq, _ = draw(SamplingParams(), num=3000)
    assert (freq > 0).all()
    assert freq.tolist() == pytest.approx(PROBS, abs=0.03)
    token, logprob = sample_tokens(LOGITS[None, :], [SamplingParams(temperature=0.5, seed=0)], [0])
    expected = torch.log_softmax(LOGITS / 0.5, dim=-1)[token.item()].item()
    assert logprob.item() == pytest.approx(expected, abs=1e-6)


def test_sampler_rows_use_their_own_settings():
    logits = LOGITS[None, :].repeat(3, 1)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, seed=1), SamplingParams(top_p=0.75)]
    seen_row2 = set()
    for position in range(200):
        tokens, logprobs = sample_tokens(logits, params, [position] * 3)
        assert tokens[0].item() == 0 and tokens[1].item() == 0
        assert logprobs[0].item() == pytest.approx(math.log(0.5), abs=1e-6)
        seen_row2.add(tokens[2].item())
    assert seen_row2 == {0, 1}


def test_greedy_rows_draw_no_random_numbers():
    """Evaluation (greedy) between rollouts must not shift the random stream that sampling uses."""
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    tokens, logprobs = sample_tokens(logits, [SamplingParams(temperature=0.0)] * 3, [0] * 3)
    after_greedy = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after_greedy, torch.rand(4))
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert torch.allclose(logprobs, torch.log_softmax(logits, dim=-1).max(dim=-1).values)


def test_seeded_row_draws_by_seed_and_position_whatever_the_batch():
    """A seeded row's token is a function of (logits, seed, position): the other rows, its row index and the
    shared stream do not matter. Uniform logits over 4096 tokens: any change of noise changes the token."""
    logits = torch.zeros(4, 4096)
    alone, _ = sample_tokens(logits[:1], [SamplingParams(seed=11)], [30])
    torch.manual_seed(0)
    params = [SamplingParams(temperature=0.7), SamplingParams(seed=5), SamplingParams(top_k=50, seed=3),
              SamplingParams(seed=11)]
    mixed, _ = sample_tokens(logits, params, [2, 30, 30, 30])
    torch.manual_seed(1)
    again, _ = sample_tokens(logits[:2], [SamplingParams(seed=11), SamplingParams(temperature=1.0)], [30, 30])
    assert mixed[3] == alone[0] and again[0] == alone[0]
    assert mixed[1] != alone[0]  # another seed at the same position
    later, _ = sample_tokens(logits[:1], [SamplingParams(seed=11)], [31])
    assert later[0] != alone[0]  # the same seed at the next position


def test_seeded_noise_differs_by_position_and_seed_and_is_exponential():
    noise = seeded_noise([11, 11, 12], [30, 31, 30], 20000, torch.device("cpu"))
    assert torch.equal(noise[0], seeded_noise([11], [30], 20000, torch.device("cpu"))[0])
    assert abs(torch.corrcoef(noise)[0, 1]) < 0.05 and abs(torch.corrcoef(noise)[0, 2]) < 0.05
    assert noise.mean().item() == pytest.approx(1.0, abs=0.02)  # Exp(1): mean 1, variance 1
    assert noise.var().item() == pytest.approx(1.0, abs=0.05)
    assert noise_key(11, 30) != noise_key(11, 31) != noise_key(12, 30)
    assert 0 <= noise_key(-5, 2**40) < 2**64  # any Python int seed maps into the generator's range


def test_seeded_sampling_follows_the_distribution():
    """Seeded rows over many positions draw from softmax(logits / T) like the shared stream does."""
    num = 3000
    tokens, _ = sample_tokens(LOGITS[None, :].repeat(num, 1), [SamplingParams(seed=4)] * num, list(range(num)))
    freq = torch.bincount(tokens, minlength=len(PROBS)).float() / num
    assert freq.tolist() == pytest.approx(PROBS, abs=0.03)
