"""Turns a scheduled batch into the model's input tensors, runs the forward pass, returns logits to sample from.

Decode batches on CUDA replay a captured CUDA graph (one per padded batch size): a decode step of a small
model is a few hundred tiny kernels, and launching them one by one from Python costs more than running them.
Padded rows point at the pool's scratch page, so they compute garbage that nobody reads and write nowhere that
matters.

Sampled tokens stay on the device: each step writes them to ``last_tokens`` (one entry per running slot), and a
step whose input token is still pending on the host (``PENDING_TOKEN``: the overlapped engine launches step k+1
before it has read step k's tokens) takes it from there. The tokens reach the host through ``Readback``: pinned
buffers filled asynchronously, with an event to wait on.
"""

from __future__ import annotations

import bisect
from typing import Callable

import numpy as np

import torch

from sluice.device import to_device
from sluice.engine.attention import AttentionMetadata
from sluice.engine.kv_pool import KVPool
from sluice.engine.scheduler import ScheduledBatch
from sluice.engine.sequence import PENDING_TOKEN, Sequence
from sluice.engine.model_ops import PagedAttention
from sluice.engine.clients.protocol import TopLogprobs
from sluice.engine.prompt_logprobs import PromptScores, plan_prompt_rows, score_prompt_rows
from sluice.engine.token_ids_logprobs import NamedTokenLogprobs
from sluice.engine.top_logprobs import TopCandidates
from sluice.models.decoder import DecoderLM


class ModelRunner:
    def __init__(self, model: DecoderLM, pool: KVPool, attend: Callable, rotary_store: Callable, context_len: int,
                 max_running: int):
        self.model = model
        self.pool = pool
        self.attend = attend
        self.rotary_store = rotary_store
        self.device = pool.device
        self.page_size = pool.shape.page_size
        self.context_len = context_len
        self.max_pages_per_seq = -(-context_len // self.page_size)
        # Block-table rows of the running sequences (row = Sequence.slot), written as pages are added, so a step
        # gathers its table with one indexing op instead of rebuilding every row from Python lists.
        self.table = np.zeros((max_running, self.max_pages_per_seq), dtype=np.int32)
        self.graphs: dict[int, "_DecodeGraph"] = {}
        self.graph_sizes: list[int] = []
        self.graph_logits: torch.Tensor | None = None
        self.last_tokens = torch.zeros(max_running, dtype=torch.int64, device=self.device)  # by Sequence.slot
        # Two of each (GPU), used in turn: a step's readback may still be in flight while the next step's starts.
        self._readback_buffers = [(torch.empty(max_running, dtype=torch.int64, pin_memory=True),
                                   torch.empty(max_running, dtype=torch.float32, pin_memory=True))
                                  for _ in range(2 if self.device.type == "cuda" else 0)]
        self._readback_turn = 0
        self._replayed_slots: torch.Tensor | None = None  # the slots of the decode graph just replayed, on device

    # ---- batch preparation ------------------------------------------------------------------------
    def attention(self, meta: AttentionMetadata, kv_caches) -> PagedAttention:
        """The attention backend the model runs a step with: this step's metadata over the paged cache."""
        return PagedAttention(meta, kv_caches, self.attend, self.rotary_store)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Input ids, positions, attention metadata, and the packed index of each sampling row."""
        size = self.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        pending_rows: list[int] = []  # packed index of each pending input token, and its sequence's slot
        pending_slots: list[int] = []
        for seq, count in zip(batch.seqs, batch.num_new_tokens):
            start, stop = seq.num_computed, seq.num_computed + count
            if seq.token_ids[stop - 1] == PENDING_TOKEN:
                pending_rows.append(cu_seqlens[-1] + count - 1)
                pending_slots.append(seq.slot)
            input_ids += seq.token_ids[start:stop]
            span = range(start, stop)
            positions += span
            pages = seq.pages
            slots += [pages[p // size] * size + p % size for p in span]
            cu_seqlens.append(cu_seqlens[-1] + count)
            seq_lens.append(stop)
            if _samples(seq, stop):
                sample_rows.append(cu_seqlens[-1] - 1)
        # Block-table widths in multiples of 16 pages: Triton specialises an integer argument (the table's row
        # stride) on its divisibility by 16, so one compiled prefill kernel serves every width.
        width = min(-(-max(len(seq.pages) for seq in batch.seqs) // 16) * 16, self.max_pages_per_seq)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(self.table_rows(batch.seqs, width), torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            cu_seqlens_q=self._tensor(cu_seqlens, torch.int32),
            max_seqlen_q=max(batch.num_new_tokens),
            max_seqlen_k=max(seq_lens),
            is_decode=batch.is_decode,
        )
        ids = self._tensor(input_ids, torch.int64)
        if pending_rows:
            ids[self._tensor(pending_rows, torch.int64)] = self.last_tokens[self._tensor(pending_slots, torch.int64)]
        return ids, self._tensor(positions, torch.int64), meta, sample_rows

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile now what the first steps would compile while serving (GPU): the prefill and eager-decode
        kernels, the compiled small ops at token counts above one, and the sampling kernels at each of their work
        splits, for greedy, sampling and mixed-temperature batches, with and without seeded rows.

        The synthetic steps write K/V only to the scratch page's first slot and read only the scratch page."""
        from sluice.engine import sampling_kernel  # Triton: CUDA only

        caches = self.pool.layer_caches()
        width = min(16, self.max_pages_per_seq)
        longest = min(width * self.page_size, self.context_len)
        for lengths, decode in (([17], False), ([3, 40], False), ([9, 9, 9], True)):
            lengths = [min(n, longest) for n in lengths]
            count = len(lengths)
            tokens = count if decode else sum(lengths)
            cu_seqlens = torch.tensor([0, *np.cumsum([1 if decode else n for n in lengths])], dtype=torch.int32)
            positions = [n - 1 for n in lengths] if decode else [p for n in lengths for p in range(n)]
            meta = AttentionMetadata(
                slot_mapping=torch.zeros(tokens, dtype=torch.int64, device=self.device),
                block_tables=torch.zeros((count, width), dtype=torch.int32, device=self.device),
                seq_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
                cu_seqlens_q=cu_seqlens.to(self.device), max_seqlen_q=1 if decode else max(lengths),
                max_seqlen_k=max(lengths), is_decode=decode)
            ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
            hidden = self.model(ids, torch.tensor(positions, device=self.device), self.attention(meta, caches))
            self.model.compute_logits(hidden[-count:])
        logits = torch.zeros((4, self.model.config.vocab_size), dtype=self.model.embed_tokens.weight.dtype,
                             device=self.device)
        for tiles_per_chunk in (1, 2, 4, 8):
            for temperatures in ([0.0] * 4, [1.0] * 4, [0.0, 1.0, 0.5, 1.0]):
                sampling_kernel.sample(logits, temperatures, tiles_per_chunk=tiles_per_chunk)
                # rows with seeds (every rollout request of a run) read per-row keys: another variant
                sampling_kernel.sample(logits, temperatures, [1, None, 2, 3], [0] * 4, tiles_per_chunk=tiles_per_chunk)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def table_rows(self, seqs, width: int) -> np.ndarray:
        """The block tables of ``seqs`` ([len(seqs), width]); entries past a sequence's pages are stale, never read."""
        table = self.table
        for seq in seqs:
            count = len(seq.pages)
            if seq.num_table_pages != count:
                start = seq.num_table_pages if seq.num_table_pages < count else 0
                table[seq.slot, start:count] = seq.pages[start:]
                seq.num_table_pages = count
        return table[[seq.slot for seq in seqs], :width]

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    # ---- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int], PromptScores | None]:
        """Logits [num sampling rows, vocab] (the model's dtype), for each its index in ``batch.seqs``, and the
        logprobs of the prompt positions the batch scores (requests with a ``logprob_start_len``; None if none).

        Nothing here waits for the device: the logits are computed in the stream's order."""
        sampled = [i for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                   if _samples(seq, seq.num_computed + n)]
        plan = plan_prompt_rows(batch)
        self._replayed_slots = None
        if (batch.is_decode and plan is None and len(sampled) == len(batch.seqs) and self.graph_sizes
                and len(batch.seqs) <= self.graph_sizes[-1]):
            logits = self._replay(batch)  # every row samples: remember() reuses the graph's slot input
            return logits[: len(batch.seqs)], sampled, None
        input_ids, positions, meta, rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, self.attention(meta, self.pool.layer_caches()))
        scores = score_prompt_rows(self.model, hidden, plan).to_host() if plan is not None else None
        if not rows:
            return hidden.new_zeros((0, 1)), sampled, scores
        return self.model.compute_logits(hidden.index_select(0, self._tensor(rows, torch.int64))), sampled, scores

    def remember(self, seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor,
                 top: TopCandidates | None = None, named: NamedTokenLogprobs | None = None) -> "Readback":
        """Keep the tokens just sampled for ``seqs`` as their next input, and start copying tokens, logprobs,
        the top candidates and named ids' logprobs of the rows that asked to the host (read them with
        ``Readback.result``)."""
        slots = self._replayed_slots if self._replayed_slots is not None and len(seqs) == len(self._replayed_slots) \
            else self._tensor([seq.slot for seq in seqs], torch.int64)
        self._replayed_slots = None
        self.last_tokens.index_copy_(0, slots, tokens)
        if self.device.type != "cuda":  # already on the host
            return Readback(tokens, logprobs, None, top, named)
        host_tokens, host_logprobs = self._readback_buffers[self._readback_turn]
        self._readback_turn ^= 1
        count = len(seqs)
        host_tokens[:count].copy_(tokens, non_blocking=True)
        host_logprobs[:count].copy_(logprobs, non_blocking=True)
        top = top.to_host() if top is not None else None
        named = named.to_host() if named is not None else None
        event = torch.cuda.Event()
        event.record()
        return Readback(host_tokens[:count], host_logprobs[:count], event, top, named)

    # ---- CUDA graphs for decode ------------------------------------------------------------------
    @torch.inference_mode()
    def capture_decode_graphs(self, max_batch_size: int) -> None:
        """Capture one decode graph per padded batch size up to ``max_batch_size`` (largest first, so the
        smaller ones reuse its memory pool)."""
        steps = [1, 2, 4, 8, *range(16, 257, 16), *range(320, max_batch_size + 1, 64)]
        sizes = sorted({s for s in steps if s <= max_batch_size} | {max_batch_size})
        pool = None
        self.graphs.clear()
        # One logits buffer for every graph: each graph's output would otherwise stay allocated (V floats a row).
        weight = self.model.embed_tokens.weight
        self.graph_logits = torch.empty((max(sizes), self.model.config.vocab_size), dtype=weight.dtype,
                                        device=self.device)
        for size in reversed(sizes):
            graph = _DecodeGraph(self, size, pool)
            pool = graph.graph.pool()
            self.graphs[size] = graph
        self.graph_sizes = sizes

    def drop_graphs(self) -> None:
        self.graphs.clear()
        self.graph_sizes = []
        self.graph_logits = None

    def _replay(self, batch: ScheduledBatch) -> torch.Tensor:
        graph = self.graphs[self.graph_sizes[bisect.bisect_left(self.graph_sizes, len(batch.seqs))]]
        logits = graph.replay(batch)
        self._replayed_slots = graph.slots[: len(batch.seqs)]
        return logits


class _DecodeGraph:
    """Static input buffers of one padded decode batch size, and the graph captured over them."""

    def __init__(self, runner: ModelRunner, batch_size: int, pool):
        device = runner.device
        self.runner = runner
        self.batch_size = batch_size
        self.input_ids = torch.zeros(batch_size, dtype=torch.int64, device=device)  # PENDING_TOKEN: see last_tokens
        self.slots = torch.zeros(batch_size, dtype=torch.int64, device=device)  # each row's Sequence.slot
        self.positions = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.meta = AttentionMetadata(
            slot_mapping=torch.zeros(batch_size, dtype=torch.int64, device=device),  # scratch page 0, slot 0
            block_tables=torch.zeros((batch_size, runner.max_pages_per_seq), dtype=torch.int32, device=device),
            seq_lens=torch.ones(batch_size, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.arange(batch_size + 1, dtype=torch.int32, device=device),
            max_seqlen_q=1,
            max_seqlen_k=runner.context_len,
            is_decode=True,
        )
        # Host staging, two sets used in turn: the previous step's copies may still be pending while this step's
        # inputs are written (the overlapped engine prepares step k+1 before step k has run).
        self.host = [torch.zeros((5, batch_size), dtype=torch.int64).pin_memory() for _ in range(2)]
        self.host_tables = [torch.zeros((batch_size, runner.max_pages_per_seq), dtype=torch.int32).pin_memory()
                            for _ in range(2)]
        self.turn = 0
        caches = runner.pool.layer_caches()
        model = runner.model
        for _ in range(2):  # warm-up outside the graph: lazy inits, Triton autotuning, cuBLAS handles
            model.compute_logits(model(self._input_ids(), self.positions, runner.attention(self.meta, caches)))
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            hidden = model(self._input_ids(), self.positions, runner.attention(self.meta, caches))
            self.logits = model.compute_logits(hidden, out=runner.graph_logits[:batch_size])

    def _input_ids(self) -> torch.Tensor:
        """The rows' input tokens, pending ones taken from the runner's last sampled tokens (inside the graph)."""
        return torch.where(self.input_ids < 0, self.runner.last_tokens[self.slots], self.input_ids)

    def replay(self, batch: ScheduledBatch) -> torch.Tensor:
        # The host buffers are pinned and copied asynchronously. This step's set was last used two steps ago, and
        # that step's results have been read back (an event wait) before this call: its copies are done.
        size = self.runner.page_size
        count = len(batch.seqs)
        host_t, tables_t = self.host[self.turn], self.host_tables[self.turn]
        self.turn ^= 1
        host, tables = host_t.numpy(), tables_t.numpy()
        host[:, count:] = 0
        host[3, count:] = 1  # seq_lens of padding rows: one token, on the scratch page
        positions = [seq.num_computed for seq in batch.seqs]
        host[0, :count] = [seq.token_ids[p] for seq, p in zip(batch.seqs, positions)]
        host[1, :count] = positions
        host[2, :count] = [seq.pages[p // size] * size + p % size for seq, p in zip(batch.seqs, positions)]
        host[3, :count] = [p + 1 for p in positions]
        host[4, :count] = [seq.slot for seq in batch.seqs]
        width = max(len(seq.pages) for seq in batch.seqs)
        tables[:count, :width] = self.runner.table_rows(batch.seqs, width)
        tables[count:, 0] = 0  # padding rows read the scratch page
        self.input_ids.copy_(host_t[0], non_blocking=True)
        self.positions.copy_(host_t[1], non_blocking=True)
        self.meta.slot_mapping.copy_(host_t[2], non_blocking=True)
        self.meta.seq_lens.copy_(host_t[3], non_blocking=True)
        self.slots.copy_(host_t[4], non_blocking=True)
        self.meta.block_tables[:, :width].copy_(tables_t[:, :width], non_blocking=True)
        self.graph.replay()
        return self.logits[:count]


def _samples(seq: Sequence, stop: int) -> bool:
    """Whether a step computing ``seq`` up to ``stop`` samples its next token: it reaches the sequence's end, and
    the request generates (max_new_tokens 0 computes the prompt only)."""
    return stop == len(seq.token_ids) and not seq.is_prefill_only


class Readback:
    """A step's sampled tokens and their logprobs (and the top candidates and named ids' logprobs of rows that
    asked) on their way to the host."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor, event: "torch.cuda.Event | None",
                 top: TopCandidates | None = None, named: NamedTokenLogprobs | None = None):
        self.tokens, self.logprobs, self.event, self.top, self.named = tokens, logprobs, event, top, named

    def result(self) -> tuple[list[int], list[float]]:
        """Wait for the copies (the step's end on the device) and return the values."""
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist(), self.logprobs.tolist()

    def top_logprobs(self) -> dict[int, TopLogprobs]:
        """The top candidates by sampled row (only rows that asked); call after ``result``."""
        return self.top.by_row() if self.top is not None else {}

    def token_ids_logprobs(self) -> dict[int, list[float]]:
        """The named ids' logprobs by sampled row (only rows that asked); call after ``result``."""
        return self.named.by_row() if self.named is not None else {}
