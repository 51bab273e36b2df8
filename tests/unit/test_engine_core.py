"""The engine's own parts: model code per architecture, paged attention, block manager, scheduler, memory."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.config import EngineConfig
from sluice.engine.attention import AttentionMetadata
from sluice.engine.attention.reference import paged_attention
from sluice.engine.block_manager import BlockManager
from sluice.engine.clients.protocol import FinishReason, GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.engine.scheduler import Scheduler
from sluice.engine.sequence import Sequence
from sluice.types import SamplingParams

from helpers.architectures import CONFIGS, PROMPTS, build_arch_checkpoint
from helpers.engine_calls import generate, greedy


def hf_reference(model, prompt: list[int], output: list[int]) -> tuple[list[int], torch.Tensor]:
    """HF greedy continuation of ``prompt`` (EOS not special: ignore_eos) and HF logprobs of ``output``."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in output:
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(output)[:, None]).squeeze(1)
    return tokens[len(prompt) :], logprobs


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_greedy_tokens_and_logprobs_match_transformers(tmp_path, arch):
    path = build_arch_checkpoint(tmp_path, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # page size 4 and a 8-token step budget: prompts span several pages and are prefilled in chunks
    engine = LocalEngine(path, EngineConfig(device="cpu", dtype="float32", page_size=4, chunked_prefill_size=8,
                                            max_running_requests=8))
    try:
        results = generate(engine, [GenerateRequest(p, greedy(10)) for p in PROMPTS])
    finally:
        engine.shutdown()
    for prompt, result in zip(PROMPTS, results):
        tokens, logprobs = hf_reference(hf, prompt, result.output_ids)
        assert result.output_ids == tokens
        assert (torch.tensor(result.output_logprobs) - logprobs).abs().max().item() < 1e-4
        assert result.finish_reason == FinishReason.LENGTH


def test_group_shares_its_prompt_pages_and_keeps_outputs_exact(lively_checkpoint):
    prompt = list(range(5, 5 + 23))
    shared = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=4))
    alone = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=4,
                                                        disable_radix_cache=True))
    try:
        requests = [GenerateRequest(prompt, SamplingParams(temperature=1.0, max_new_tokens=6, seed=i)) for i in range(8)]
        with_cache = generate(shared, requests)
        without = generate(alone, [GenerateRequest(r.input_ids, r.sampling_params) for r in requests])
        assert [r.output_ids for r in with_cache] == [r.output_ids for r in without]
        for a, b in zip(with_cache, without):
            assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 1e-5
        # 22 of the 23 prompt tokens fill 5 full pages: 7 of the 8 samples reuse them, one computes them
        assert sorted(r.cached_tokens for r in with_cache) == [0] + [20] * 7
        assert shared.stats.num_prefill_tokens < alone.stats.num_prefill_tokens
        assert all(r.cached_tokens == 0 for r in without)
    finally:
        shared.shutdown()
        alone.shutdown()


def test_preemption_by_recompute_keeps_outputs_exact_and_nothing_starves(lively_checkpoint):
    hf = AutoModelForCausalLM.from_pretrained(lively_checkpoint, dtype=torch.float32).eval()
    # 12 pages of 4 tokens: 6 requests of 6 + 16 tokens cannot all hold their pages at once
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=4,
                                                         max_total_tokens=44, disable_radix_cache=True))
    prompts = [[7 + i, 8, 9, 10, 11, 12] for i in range(6)]
    try:
        results = generate(engine, [GenerateRequest(p, greedy(16)) for p in prompts])
        assert engine.scheduler.num_preemptions > 0
    finally:
        engine.shutdown()
    for prompt, result in zip(prompts, results):
        tokens, logprobs = hf_reference(hf, prompt, result.output_ids)
        assert result.output_ids == tokens and len(tokens) == 16
        assert (torch.tensor(result.output_logprobs) - logprobs).abs().max().item() < 1e-4


def test_weight_update_flushes_cached_prefixes(lively_checkpoint, lively_checkpoint_other):
    prompt = list(range(5, 5 + 19))
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=4))
    fresh = LocalEngine(lively_checkpoint_other, EngineConfig(device="cpu", dtype="float32", page_size=4))
    try:
        generate(engine, [GenerateRequest(prompt, greedy(4))])
        engine.update_weights(lively_checkpoint_other, version=1)
        after = generate(engine, [GenerateRequest(prompt, greedy(8))])[0]
        expected = generate(fresh, [GenerateRequest(prompt, greedy(8))])[0]
        assert after.cached_tokens == 0 and after.weight_version == 1
        assert after.output_ids == expected.output_ids
        assert max(abs(a - b) for a, b in zip(after.output_logprobs, expected.output_logprobs)) < 1e-5
        with pytest.raises(ValueError, match="older"):
            engine.update_weights(lively_checkpoint, version=0)
    finally:
        engine.shutdown()
        fresh.shutdown()


def test_release_and_resume_memory_and_flush_cache(lively_checkpoint):
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=4))
    prompt = list(range(5, 5 + 13))
    try:
        before = generate(engine, [GenerateRequest(prompt, greedy(6))])[0]
        engine.release_memory()
        assert not engine.pool.allocated
        done = threading.Event()
        box = []
        engine.submit(GenerateRequest(prompt, greedy(6)), lambda r: (box.append(r), done.set()))
        assert not done.wait(0.3)  # nothing runs while the memory is released
        engine.resume_memory()
        assert done.wait(30)
        assert box[0].output_ids == before.output_ids
        assert engine.flush_cache() is True
        again = generate(engine, [GenerateRequest(prompt, greedy(6))])[0]
        assert again.cached_tokens == 0 and again.output_ids == before.output_ids
    finally:
        engine.shutdown()


def test_bad_requests_are_refused_at_submit(lively_checkpoint):
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", max_total_tokens=64))
    try:
        with pytest.raises(ValueError, match="empty"):
            engine.submit(GenerateRequest([], greedy(2)), lambda r: None)
        with pytest.raises(ValueError, match=r"\[0, 102\)"):
            engine.submit(GenerateRequest([5, 500], greedy(2)), lambda r: None)
        with pytest.raises(ValueError, match="KV pool"):
            engine.submit(GenerateRequest([5] * 100, greedy(2)), lambda r: None)
    finally:
        engine.shutdown()


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(vocab_size=102, n_embd=16, n_layer=1, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    from sluice.models import build_model

    from transformers import AutoConfig

    with pytest.raises(ValueError, match="GPT2LMHeadModel.*Qwen2ForCausalLM"):
        build_model(AutoConfig.from_pretrained(tmp_path), torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------ paged attention
def test_reference_paged_attention_equals_per_sequence_attention():
    torch.manual_seed(0)
    page_size, heads_q, heads_kv, dim = 4, 4, 2, 8
    k_cache = torch.randn(20, page_size, heads_kv, dim)
    v_cache = torch.randn(20, page_size, heads_kv, dim)
    seqs = [(7, 3), (5, 5), (9, 1)]  # (kv_len, q_len)
    pages = [[3, 11], [5, 2], [17, 1, 9]]  # scattered, out of order
    queries = [torch.randn(q, heads_q, dim) for _, q in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(9, dtype=torch.int64),
        block_tables=torch.tensor([p + [0] * (3 - len(p)) for p in pages], dtype=torch.int32),
        seq_lens=torch.tensor([kv for kv, _ in seqs], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, 3, 8, 9], dtype=torch.int32),
        max_seqlen_q=5, max_seqlen_k=9, is_decode=False,
    )
    out = paged_attention(torch.cat(queries), k_cache, v_cache, meta, scale=0.3)
    expected = []
    for (kv_len, q_len), table, q in zip(seqs, pages, queries):
        keys = k_cache[table].reshape(-1, heads_kv, dim)[:kv_len].repeat_interleave(2, dim=1)
        values = v_cache[table].reshape(-1, heads_kv, dim)[:kv_len].repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * 0.3
        q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
        scores = scores.masked_fill(torch.arange(kv_len)[None, :] > q_pos, float("-inf"))
        expected.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
    assert torch.allclose(out, torch.cat(expected), atol=1e-5)


# ------------------------------------------------------------------------------------ block manager
def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    request = GenerateRequest(tokens, greedy(4), rid=rid)
    return Sequence(request, lambda r: None, None, list(tokens), len(tokens))


def test_block_manager_shares_revives_and_evicts_cached_pages():
    blocks = BlockManager(num_pages=6, page_size=2)  # 5 usable pages
    first = make_seq([1, 2, 3, 4, 5], "a")
    blocks.admit(first, [])
    blocks.reserve(first, 5)
    first.num_computed = 5
    blocks.register_computed(first)
    assert len(first.pages) == 3 and blocks.num_free == 2
    second = make_seq([1, 2, 3, 4, 9], "b")
    prefix, blocked = blocks.match_prefix(second)
    assert prefix == first.pages[:2] and not blocked
    blocks.admit(second, prefix)
    assert [blocks.refcount[p] for p in prefix] == [2, 2] and second.num_computed == 4
    blocks.release(first)
    blocks.release(second)
    assert blocks.num_free == 5
    third = make_seq([1, 2, 3, 4, 7], "c")  # revives the freed but still cached pages
    assert blocks.match_prefix(third)[0] == prefix
    # taking every free page evicts the cached ones: the prefix is gone afterwards
    hog = make_seq(list(range(20, 30)), "d")
    blocks.admit(hog, [])
    blocks.reserve(hog, 10)
    assert blocks.num_free == 0 and blocks.match_prefix(third)[0] == []
    with pytest.raises(RuntimeError):
        blocks.reserve(make_seq([1, 2, 3], "e"), 3)


def test_a_page_being_computed_makes_a_same_prompt_request_wait_instead_of_recomputing():
    blocks = BlockManager(num_pages=10, page_size=2)
    owner = make_seq([1, 2, 3, 4, 5], "a")
    blocks.match_prefix(owner)
    blocks.admit(owner, [])
    blocks.reserve(owner, 5)
    follower = make_seq([1, 2, 3, 4, 5], "b")
    assert blocks.match_prefix(follower) == ([], True)
    owner.num_computed = 5
    blocks.register_computed(owner)
    assert blocks.match_prefix(follower) == (owner.pages[:2], False)


def test_scheduler_chunks_long_prompts_and_decodes_running_sequences_first():
    blocks = BlockManager(num_pages=64, page_size=4)
    scheduler = Scheduler(blocks, max_running_requests=4, max_batched_tokens=8)
    short, long = make_seq([1, 2, 3], "s"), make_seq(list(range(10, 30)), "l")
    scheduler.add(short)
    scheduler.add(long)
    batch = scheduler.schedule()
    assert [s.rid for s in batch.seqs] == ["s", "l"] and batch.num_new_tokens == [3, 5]
    for seq, count in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed += count
    short.token_ids.append(40)  # the short one sampled a token; the long one is mid-prefill
    batch = scheduler.schedule()
    assert [s.rid for s in batch.seqs] == ["s", "l"] and batch.num_new_tokens == [1, 7]
    with pytest.raises(ValueError, match="token budget"):
        Scheduler(blocks, max_running_requests=16, max_batched_tokens=8)


def test_scheduler_admits_new_sequences_in_batches_while_others_decode():
    blocks = BlockManager(num_pages=256, page_size=4)
    scheduler = Scheduler(blocks, max_running_requests=16, max_batched_tokens=64)  # admits 2 at a time
    for index in range(16):
        scheduler.add(make_seq([1, 2, 3], f"r{index}"))
    batch = scheduler.schedule()
    assert len(batch.seqs) == 16
    for seq, count in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed += count
        seq.token_ids.append(7)
    late = [make_seq([4, 5], "late0"), make_seq([4, 6], "late1")]
    for seq in late:
        scheduler.add(seq)
    scheduler.finish(scheduler.running[0])  # one slot free: not worth an eager prefill step yet
    assert all(s.rid != "late0" for s in scheduler.schedule().seqs)
    scheduler.finish(scheduler.running[0])  # two free: both come in together
    assert {"late0", "late1"} <= {s.rid for s in scheduler.schedule().seqs}


def test_each_output_token_carries_the_weight_version_that_sampled_it(lively_checkpoint, lively_checkpoint_other):
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cpu", dtype="float32", page_size=4))
    try:
        first_token = threading.Event()
        done = threading.Event()
        box = []

        def on_update(ids, logprobs, top, named):  # on the worker thread, between steps: pause before the next one
            if not first_token.is_set():
                engine.pause()
                first_token.set()

        engine.pause()
        engine.submit(GenerateRequest([5, 6, 7], greedy(12)), lambda r: (box.append(r), done.set()), on_update)
        engine.resume()
        assert first_token.wait(30)  # paused after the first token: swap the weights, then go on
        engine.update_weights(lively_checkpoint_other, version=3)
        engine.resume()
        assert done.wait(30)
        versions = box[0].weight_versions
        assert len(versions) == 12 and versions[0] == 0 and versions[1:] == [3] * 11
        assert box[0].weight_version == 3
    finally:
        engine.shutdown()
