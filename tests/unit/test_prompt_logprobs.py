"""Prompt-token logprobs (``logprob_start_len``) and prefill-only requests (``max_new_tokens`` 0) in the
in-process engine (CPU, float32), checked against a transformers forward of the same checkpoint: from several
start positions, across prefill chunks and pages, with a warm prefix cache, under preemption, with the
overlapped read-back, and with the top candidates and the logprobs of named token ids."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.config import EngineConfig
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import FinishReason, GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.engine.prompt_logprobs import PromptRows, score_prompt_rows
from sluice.engine.sequence import Sequence
from sluice.types import SamplingParams

from helpers.reference import hf_prompt_logprobs, hf_token_ids_logprobs

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")

PROMPT = [(7 * i + 3) % 90 + 5 for i in range(45)]  # 45 tokens: three pages of 16, prefilled in chunks of 16


@pytest.fixture(scope="module")
def small_engine(lively_checkpoint):
    """Pages of 16 tokens, prefill chunks of 16 tokens, room for few pages: chunking, caching and preemption."""
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=16,
                                                         chunked_prefill_size=16, max_running_requests=4,
                                                         max_total_tokens=512))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_model(lively_checkpoint):
    return AutoModelForCausalLM.from_pretrained(lively_checkpoint, dtype=torch.float32).eval()


def generate(engine, *requests: GenerateRequest):
    client = InProcessClient(engine)

    async def together():
        return await asyncio.gather(*(client.generate(r) for r in requests))

    return asyncio.run(together())


def scoring(prompt, start, max_new_tokens=3, top=0, temperature=0.0) -> GenerateRequest:
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, ignore_eos=True)
    return GenerateRequest(list(prompt), params, logprob_start_len=start, top_logprobs_num=top)


def assert_reference(result, hf_model, prompt, start, top=0, temperature=1.0):
    values, tops = hf_prompt_logprobs(hf_model, prompt, start, top, temperature)
    assert len(result.input_logprobs) == len(prompt) - start
    assert result.input_logprobs[0] is None
    assert result.input_logprobs[1:] == pytest.approx(values, abs=1e-4)
    if top:
        assert result.input_top_logprobs[0] is None and len(result.input_top_logprobs) == len(prompt) - start
        for got, (ids, logprobs) in zip(result.input_top_logprobs[1:], tops):
            assert got.token_ids == ids and got.logprobs == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize("start", [0, 1, 15, 16, 17, 30, 43, 44])
def test_prompt_logprobs_match_the_reference_from_each_start(small_engine, hf_model, start):
    small_engine.flush_cache()
    result = generate(small_engine, scoring(PROMPT, start))[0]
    assert_reference(result, hf_model, PROMPT, start)
    assert len(result.output_ids) == 3


def test_a_warm_prefix_cache_gives_the_same_prompt_logprobs(small_engine, hf_model):
    small_engine.flush_cache()
    first = generate(small_engine, scoring(PROMPT, 0, top=3))[0]
    again = generate(small_engine, scoring(PROMPT, 0, top=3))[0]
    assert again.input_logprobs == first.input_logprobs and again.input_top_logprobs == first.input_top_logprobs
    assert_reference(again, hf_model, PROMPT, 0, top=3)
    assert again.cached_tokens == 0  # the cache may serve no position to score
    later = generate(small_engine, scoring(PROMPT, 33))[0]  # two cached pages lie before the start
    assert later.cached_tokens == 32
    assert_reference(later, hf_model, PROMPT, 33)
    assert later.input_logprobs[1:] == first.input_logprobs[34:]
    sharing = PROMPT[:40] + [9, 8, 7, 6, 5]  # shares 40 tokens (two full pages) with the prompt above
    shared = generate(small_engine, scoring(sharing, 2))[0]
    assert_reference(shared, hf_model, sharing, 2)
    plain = generate(small_engine, scoring(PROMPT, -1))[0]  # no scoring: the cache serves what it holds
    assert plain.cached_tokens == 32 and plain.input_logprobs == [None]


def test_top_candidates_and_temperature_follow_the_output_convention(small_engine, hf_model):
    result = generate(small_engine, scoring(PROMPT, 5, top=4, temperature=0.7))[0]
    assert_reference(result, hf_model, PROMPT, 5, top=4, temperature=0.7)


def test_prefill_only_returns_the_prompt_logprobs_and_no_token(small_engine, hf_model):
    scored, plain = generate(small_engine, scoring(PROMPT, 3, max_new_tokens=0, top=2),
                             scoring(PROMPT[:20], -1, max_new_tokens=0))
    assert scored.output_ids == [] and scored.output_logprobs == [] and scored.finish_reason is FinishReason.LENGTH
    assert_reference(scored, hf_model, PROMPT, 3, top=2)
    assert plain.output_ids == [] and plain.input_logprobs == [] and plain.finish_reason is FinishReason.LENGTH


def test_scoring_survives_preemption_and_the_overlapped_read_back(lively_checkpoint, hf_model):
    """Room for 5 pages only: four 40-token prompts, two of them decoding to 60 tokens (4 pages), preempt one
    another; with the overlapped read-back on, scores are read a step after their launch."""
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=16,
                                                         chunked_prefill_size=32, max_running_requests=4,
                                                         max_total_tokens=80))
    engine.overlap = True
    try:
        prompts = [[(t + 11 * k) % 95 + 3 for t in PROMPT[:40]] for k in range(4)]
        results = generate(engine, *(scoring(p, k, max_new_tokens=20 if k % 2 else 0) for k, p in enumerate(prompts)))
        for k, (prompt, result) in enumerate(zip(prompts, results)):
            assert_reference(result, hf_model, prompt, k)
            assert len(result.output_ids) == (20 if k % 2 else 0)
        assert engine.scheduler.num_preemptions > 0
    finally:
        engine.shutdown()


def test_named_token_ids_follow_the_convention_across_chunks_and_the_overlapped_read_back(lively_checkpoint, hf_model):
    """Prompt positions scored over three prefill chunks and the output positions, read a step after launch; a
    batch-mate that names no ids gets none."""
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=16,
                                                         chunked_prefill_size=16, max_running_requests=4,
                                                         max_total_tokens=512))
    engine.overlap = True
    try:
        named = [9, 0, 9, 101]
        asking = scoring(PROMPT, 2, max_new_tokens=4, temperature=0.7)
        asking.token_ids_logprob = named
        result, plain = generate(engine, asking, scoring(PROMPT[:30], 0))
        tokens = PROMPT + result.output_ids
        assert result.input_token_ids_logprobs[0] is None and len(result.input_token_ids_logprobs) == len(PROMPT) - 2
        expected = hf_token_ids_logprobs(hf_model, PROMPT, range(2, len(PROMPT) - 1), named, 0.7)
        for got, reference in zip(result.input_token_ids_logprobs[1:], expected):
            assert got == pytest.approx(reference, abs=1e-4)
        expected = hf_token_ids_logprobs(hf_model, tokens, range(len(PROMPT) - 1, len(tokens) - 1), named, 0.7)
        assert len(result.output_token_ids_logprobs) == 4
        for got, reference in zip(result.output_token_ids_logprobs, expected):
            assert got == pytest.approx(reference, abs=1e-4)
        assert plain.input_token_ids_logprobs == [] and plain.output_token_ids_logprobs == []
    finally:
        engine.shutdown()


def test_bad_named_token_ids_are_refused(small_engine):
    for ids, words in (([3, 102], "outside the vocabulary"), ([3, -1], "outside the vocabulary"),
                       ([True], "list of token ids"), ((3,), "list of token ids")):
        request = scoring(PROMPT, -1)
        request.token_ids_logprob = ids
        with pytest.raises(ValueError, match=words):
            small_engine.submit(request, lambda _: None)
    silent = GenerateRequest(PROMPT, SamplingParams(), return_logprob=False, token_ids_logprob=[3])
    with pytest.raises(ValueError, match="return_logprob"):
        small_engine.submit(silent, lambda _: None)


def test_out_of_range_starts_are_refused(small_engine):
    for start, words in ((45, "less than the number of input tokens (45)"), (-2, "-1 (the default)")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            small_engine.submit(scoring(PROMPT, start), lambda _: None)
    silent = GenerateRequest(PROMPT, SamplingParams(), return_logprob=False, logprob_start_len=0)
    with pytest.raises(ValueError, match="return_logprob"):
        small_engine.submit(silent, lambda _: None)


def test_scoring_in_slices_of_rows_equals_one_pass(small_engine):
    """The log-softmax runs over slices of rows (bounded memory); slices of 3 rows give what one pass gives, and
    each row is log_softmax(logits / temperature) at its target, with its request's top candidates."""
    model = small_engine.model
    vocab = model.config.vocab_size
    hidden = torch.randn(20, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    seqs = [Sequence(GenerateRequest([1, 2], SamplingParams(temperature=t), top_logprobs_num=k), None, None, None,
                     [1, 2], 2) for t, k in ((0.0, 2), (0.5, 0))]
    targets = [(3 * r) % vocab for r in range(10)]
    plan = PromptRows(rows=list(range(0, 20, 2)), targets=targets, seqs=seqs, counts=[6, 4])
    scale = torch.tensor([1.0] * 6 + [0.5] * 4)[:, None]  # greedy rows at temperature 1
    with torch.inference_mode():
        whole = score_prompt_rows(model, hidden, plan)
        sliced = score_prompt_rows(model, hidden, plan, max_floats=3 * vocab)
        expected = torch.log_softmax(model.compute_logits(hidden[::2]).float() / scale, -1)
    # a matmul over fewer rows may round differently in the last bit
    assert torch.allclose(whole.logprobs, sliced.logprobs, atol=1e-6) and torch.equal(whole.top_ids, sliced.top_ids)
    assert torch.allclose(whole.logprobs, expected[torch.arange(10), torch.tensor(targets)], atol=1e-6)
    assert torch.equal(whole.top_ids[:6], expected[:6].topk(2, -1).indices)
    sliced.deliver()
    assert [len(seq.input_logprobs) for seq in seqs] == [6, 4]
    assert [len(seq.input_top_logprobs) for seq in seqs] == [6, 0]
    assert all(len(top.token_ids) == 2 for top in seqs[0].input_top_logprobs)
