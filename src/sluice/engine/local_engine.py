"""The in-process engine: a worker thread that steps the scheduler and the model runner; control calls from any thread.

Threads and locks:
- ``_cond`` guards the hand-over lists (new submissions, the rid -> sequence map, pause/closed flags); callers
  never touch the scheduler directly.
- ``_step_lock`` is held by the worker for a whole step (schedule, forward, sample, bookkeeping) and by control
  calls that change the model, the pool or the prefix cache (weight updates, flush, memory release). So weights
  change between steps, never inside one, and a flush never races an allocation. A control call first says it
  is waiting (``_exclusive``); the worker then reads back the step in flight and stops until the call is done.
- Callbacks (``on_done``, ``on_update``) run on the worker thread outside both locks.

Overlap (GPU): a step's tokens are sampled on the device and copied back asynchronously, and the worker
schedules and launches the next step before it reads them, so the host's work (scheduling, input preparation,
stop checks, callbacks) runs while the device computes. The next step takes each pending token from the
device (``ModelRunner.last_tokens``). A sequence that stops on the token just read has already been given one
more step: that token is dropped. A sequence whose pending token is its last by length is not scheduled again.
On CPU the device is the host: each step is read back at once.
"""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
from transformers import AutoConfig

from sluice.device import resolve_device, resolve_dtype
from sluice.engine.block_manager import BlockManager
from sluice.engine.clients.protocol import FinishReason, GenerateRequest, GenerateResult, NamedTensors, TopLogprobs
from sluice.engine.kv_pool import KVPool, KVShape, pages_for_memory
from sluice.engine.model_ops import engine_ops
from sluice.engine.model_runner import ModelRunner, Readback
from sluice.engine.prompt_logprobs import PromptScores
from sluice.engine.sampler import sample_tokens
from sluice.engine.scheduler import ScheduledBatch, Scheduler
from sluice.engine.sequence import PENDING_TOKEN, OnDone, OnInputLogprobs, OnUpdate, Sequence, SequenceState
from sluice.engine.settings import EngineConfig
from sluice.engine.stats import EngineStats
from sluice.engine.stopping import StopChecker
from sluice.engine.token_ids_logprobs import token_ids_logprobs
from sluice.engine.top_logprobs import top_logprobs
from sluice.models import load_model
from sluice.models.loading import hf_named_tensors, load_hf_weights
from sluice.models.tokenizer import load_tokenizer
from sluice.weights.buckets import checksum_mismatches, named_checksums
from sluice.weights.safetensors_files import iter_safetensors

CPU_DEFAULT_MAX_TOTAL_TOKENS = 65536


class LocalEngine:
    def __init__(self, model_path: str, config: EngineConfig = EngineConfig()):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(model_path)
        self.model_config = AutoConfig.from_pretrained(model_path)
        self.model_path = str(model_path)
        self.model = load_model(model_path, self.device, self.dtype)
        ops = engine_ops(self.device)  # compiled ops and the Triton K/V write on GPU, eager on CPU
        self.model.ops = ops.decoder
        self.context_len = int(config.context_length or self.model_config.max_position_embeddings)
        self.stops = StopChecker(self.tokenizer, self.model_config, self.context_len)
        kv_shape = KVShape(len(self.model.layers), self.model.num_kv_heads, self.model.head_dim, config.page_size, self.dtype)
        self.pool = KVPool(kv_shape, self._num_pages(kv_shape), self.device)
        self.blocks = BlockManager(self.pool.num_pages, config.page_size, enable_prefix_cache=not config.disable_radix_cache)
        self.max_running_requests = config.max_running_requests
        budget = config.chunked_prefill_size or (8192 if self.device.type == "cuda" else 4096)
        self.scheduler = Scheduler(self.blocks, config.max_running_requests, max(budget, config.max_running_requests))
        attend, graphable = _attention_backend(self.device, self.model.head_dim)
        self.runner = ModelRunner(self.model, self.pool, attend, ops.rotary_store, self.context_len,
                                  config.max_running_requests)
        self._use_graphs = graphable and not config.disable_cuda_graph
        if self._use_graphs:
            self.runner.capture_decode_graphs(min(config.cuda_graph_max_bs or 512, config.max_running_requests))
        if self.device.type == "cuda":
            self.runner.warm_up()
        # On CPU overlapping gains nothing (the host computes the step), so it is off there; tests turn it on to
        # check the same bookkeeping without a GPU. Change it only while the engine is idle.
        self.overlap = self.device.type == "cuda" and not config.disable_overlap_schedule
        self._in_flight: _Launched | None = None  # launched, not read back yet (overlap only, between steps)
        self._waiting_callers = 0  # control calls waiting for the step lock (see _exclusive)
        self.weight_version = 0
        self._incoming: list[Sequence] = []
        self._by_rid: dict[str, list[Sequence]] = {}
        self._to_abort: list[Sequence] = []  # abort() hands these to the worker; checked once per step
        self._paused = False
        self._released = False
        self._closed = False
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self.stats = EngineStats()
        self._worker = threading.Thread(target=self._loop, name="sluice-engine", daemon=True)
        self._worker.start()

    def _num_pages(self, shape: KVShape) -> int:
        size = shape.page_size
        if self.config.max_total_tokens:
            return -(-self.config.max_total_tokens // size) + 1
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.config.mem_fraction_static) - (total - free)
            pages = pages_for_memory(shape, budget)
            if pages < 2:
                raise RuntimeError(
                    f"--sglang-mem-fraction-static {self.config.mem_fraction_static} leaves no memory for the KV "
                    f"cache after the weights ({(total - free) / 2**30:.1f} GiB in use of {total / 2**30:.1f} GiB); "
                    "raise it, or set --sglang-max-total-tokens"
                )
            return pages
        tokens = min(CPU_DEFAULT_MAX_TOTAL_TOKENS, self.context_len * self.config.max_running_requests)
        return -(-tokens // size) + 1

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pool.capacity_tokens

    # ---- requests (any thread) ----------------------------------------------------------------------
    def submit(self, request: GenerateRequest, on_done: OnDone, on_update: OnUpdate | None = None,
               on_input_logprobs: OnInputLogprobs | None = None) -> None:
        """Queue a request; ``on_done`` gets the GenerateResult (or an exception), on the worker thread.
        ``on_update`` gets each batch of new tokens; ``on_input_logprobs`` the prompt logprobs, once, before the
        first ``on_update`` (a stream shows them from its first chunk, as SGLang's does)."""
        prompt = list(request.input_ids)
        if not prompt:
            raise ValueError("input_ids is empty: a request needs at least one prompt token")
        if len(prompt) >= self.context_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context length {self.context_len}")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}); got {min(prompt)}..{max(prompt)}")
        if len(prompt) + 1 > self.pool.capacity_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the KV pool ({self.pool.capacity_tokens} tokens)")
        if not 0 <= request.top_logprobs_num <= vocab:
            raise ValueError(f"top_logprobs_num must lie in [0, {vocab}] (the vocabulary size); "
                             f"got {request.top_logprobs_num}")
        _check_token_ids_logprob(request, vocab)
        seed = request.sampling_params.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):  # the sampler hashes it
            raise ValueError(f"sampling_params.seed must be an int or None; got {type(seed).__name__} {seed!r}")
        if self.tokenizer is None and request.sampling_params.stop:
            raise ValueError("stop strings need a tokenizer; this engine runs with --sglang-skip-tokenizer-init")
        if request.sampling_params.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {request.sampling_params.max_new_tokens}")
        start = _input_logprob_start(request, len(prompt))
        seq = Sequence(request, on_done, on_update, prompt, len(prompt), input_logprob_start=start,
                       on_input_logprobs=on_input_logprobs)
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is shut down")
            self._incoming.append(seq)
            self._by_rid.setdefault(request.rid, []).append(seq)
            self._cond.notify_all()

    def abort(self, rid: str | None = None) -> None:
        """Abort submitted requests (all, or those with this rid); each returns its partial output."""
        with self._cond:
            if rid is None:
                targets = [seq for seqs in self._by_rid.values() for seq in seqs]
            else:
                targets = list(self._by_rid.get(rid, []))
            self._to_abort.extend(targets)
            self._cond.notify_all()

    def pause(self) -> None:
        """Stop stepping; running and queued requests are kept and continue after ``resume``."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # ---- model and memory (any thread; wait for the current step to end) ----------------------------
    def update_weights(self, weights: NamedTensors | str, version: int,
                       checksums: Mapping[str, int] | None = None) -> int:
        """Load HF-named tensors or a checkpoint directory between steps; returns the number of tensors.

        ``checksums`` (by HF name, the sums of weights/buckets.py): every incoming tensor is checked before the first copy,
        and a mismatch refuses the whole update (ValueError naming the tensors); a directory is then read into
        memory first. Cached prefixes were computed with the old weights, so the prefix cache is flushed.
        Requests in flight continue on the new weights.
        """
        self._check_version(version)
        if checksums is not None:
            if not isinstance(weights, Mapping):
                weights = dict(iter_safetensors(weights))
            problems = checksum_mismatches(weights, checksums)
            if problems:
                more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
                raise ValueError(f"weight version {version} refused, its checksums do not match: "
                                 f"{'; '.join(problems[:5])}{more}")
        with self._exclusive():
            self._check_version(version)
            count = len(load_hf_weights(self.model, weights))
            self.blocks.flush()
            self.weight_version = version
        return count

    def _check_version(self, version: int) -> None:
        if version < self.weight_version:
            raise ValueError(f"weight version {version} is older than the engine's {self.weight_version}")

    def weight_checksums(self) -> tuple[int, dict[str, int]]:
        """The weight version and each weight's checksum by HF name, read together between steps."""
        with self._exclusive():
            return self.weight_version, named_checksums(hf_named_tensors(self.model))

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The engine's current weights under HF names (views: copy before changing them)."""
        return hf_named_tensors(self.model)

    def flush_cache(self) -> bool:
        """Forget cached prefixes; refused (False) while requests are in flight, as SGLang does."""
        with self._exclusive():
            with self._cond:
                busy = self.scheduler.has_work() or bool(self._incoming)
            if busy:
                return False
            self.blocks.flush()
            return True

    def release_memory(self) -> None:
        """Free the KV pool and move the weights to host memory (for a colocated trainer).

        Running requests are preempted (their K/V recomputed later); nothing is stepped until resume_memory.
        """
        with self._exclusive():
            with self._cond:
                self._released = True
            for seq in list(self.scheduler.running):
                self.scheduler.preempt(seq)
            self.blocks.flush()
            self.runner.drop_graphs()
            self.pool.release()
            self.model.to("cpu")

    def resume_memory(self) -> None:
        with self._exclusive():
            self.model.to(self.device)
            self.pool.allocate()
            if self._use_graphs:
                self.runner.capture_decode_graphs(min(self.config.cuda_graph_max_bs or 512, self.max_running_requests))
            with self._cond:
                self._released = False
                self._cond.notify_all()

    def load(self) -> dict:
        with self._cond:
            num_waiting = len(self.scheduler.waiting) + len(self._incoming)
            num_running = len(self.scheduler.running)
        used_pages = self.pool.num_pages - 1 - self.blocks.num_free
        return {"num_running": num_running, "num_waiting": num_waiting,
                "num_tokens": used_pages * self.blocks.page_size, "kv_capacity_tokens": self.pool.capacity_tokens}

    def shutdown(self) -> None:
        """Abort what is in flight, stop the worker, and give the KV pool and graphs' memory back."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)
        with self._exclusive():
            self.runner.drop_graphs()
            self.pool.release()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the step lock with no step in flight: while a caller waits here the worker launches nothing new,
        reads back the step in flight, and then stays idle. (A callback on the worker thread itself cannot wait
        for the worker: the step it launched just before stays in flight, in stream order before this call's
        device work.)"""
        with self._cond:
            self._waiting_callers += 1
            self._cond.notify_all()
        try:
            while True:
                self._step_lock.acquire()
                if (self._in_flight is None or not self._worker.is_alive()
                        or threading.current_thread() is self._worker):
                    break
                self._step_lock.release()  # the worker launched a step before it saw us: it reads it back next
                with self._cond:
                    self._cond.wait_for(lambda: self._in_flight is None or not self._worker.is_alive(), timeout=1.0)
            try:
                yield
            finally:
                self._step_lock.release()
        finally:
            with self._cond:
                self._waiting_callers -= 1
                self._cond.notify_all()

    # ---- worker thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._can_step)
                closed = self._closed
                for seq in self._incoming:
                    self.scheduler.add(seq)
                self._incoming.clear()
            if closed:
                self._abort_everything()
                return
            done: list[Sequence] = []
            updates: list[Sequence] = []
            try:
                with self._step_lock:
                    self._step(done, updates)
                if self._waiting_callers:  # a control call may be waiting for the step in flight to be read back
                    with self._cond:
                        self._cond.notify_all()
            except Exception as error:  # a failed step must not hang its callers: fail every request
                with self._step_lock:
                    self._in_flight = None
                    failed = self._drop_everything()
                for seq in failed:
                    _call(seq.on_done, error)
                continue
            self._notify(done, updates)

    def _can_step(self) -> bool:
        if self._closed or self._incoming or self._in_flight is not None:
            return True
        if self._waiting_callers:
            return False
        return bool(self._to_abort) or (self.scheduler.has_work() and not self._paused and not self._released)

    def _step(self, done: list[Sequence], updates: list[Sequence]) -> None:
        """Retire aborted requests, launch the next batch, then read back the previous one (overlap) or this one."""
        with self._cond:
            to_abort, self._to_abort = self._to_abort, []
            idle = self._paused or self._released or self._waiting_callers > 0
        for seq in to_abort:
            if seq.state != SequenceState.FINISHED:
                seq.finish = FinishReason.ABORT
                self._retire(seq, done)
        batch = None if idle else self.scheduler.schedule()
        launched = self._launch(batch) if batch is not None else None
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._read_back(previous, done, updates)
        if launched is not None and self.overlap:
            self._in_flight = launched
        elif launched is not None:
            self._read_back(launched, done, updates)

    def _launch(self, batch: ScheduledBatch) -> "_Launched":
        """Run the batch and sample on the device; each sampled sequence gets a pending token."""
        started = time.perf_counter()
        logits, rows, scores = self.runner.run(batch)
        prompts_done = []  # max_new_tokens 0: done once this step's prompt logprobs are read back
        for seq, count in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += count
            if seq.is_prefill_only and seq.num_computed == len(seq.token_ids):
                seq.finishing = True  # nothing more to schedule
                prompts_done.append(seq)
        seqs = [batch.seqs[i] for i in rows]
        readback = None
        positions = [len(seq.token_ids) for seq in seqs]  # of the tokens drawn now: a seeded row's noise keys on it
        if seqs:
            params = [s.request.sampling_params for s in seqs]
            token_t, logprob_t = sample_tokens(logits, params, positions)
            top = top_logprobs(logits, params, [s.request.top_logprobs_num for s in seqs])
            named = token_ids_logprobs(logits, params, [s.request.token_ids_logprob for s in seqs])
            readback = self.runner.remember(seqs, token_t, logprob_t, top, named)
            for seq in seqs:
                seq.token_ids.append(PENDING_TOKEN)
                num_output = len(seq.token_ids) - seq.num_prompt_tokens
                seq.finishing = (num_output >= seq.request.sampling_params.max_new_tokens
                                 or len(seq.token_ids) >= self.context_len)
        return _Launched(batch, seqs, positions, readback, self.weight_version, time.perf_counter() - started,
                         scores, prompts_done)

    def _read_back(self, launched: "_Launched", done: list[Sequence], updates: list[Sequence]) -> None:
        """Put the step's tokens in place of their pending entries; stop checks; prefix-cache registration."""
        started = time.perf_counter()
        tokens, logprobs = launched.readback.result() if launched.readback is not None else ([], [])
        tops = launched.readback.top_logprobs() if launched.readback is not None else {}
        named = launched.readback.token_ids_logprobs() if launched.readback is not None else {}
        if launched.prompt_scores is not None:
            launched.prompt_scores.deliver()
        synced = time.perf_counter()
        for seq in launched.prompts_done:
            if seq.state != SequenceState.FINISHED:  # not aborted meanwhile
                seq.finish = FinishReason.LENGTH
                self._retire(seq, done)
        for row, (seq, position, token, logprob) in enumerate(zip(launched.seqs, launched.positions, tokens, logprobs)):
            if seq.state == SequenceState.FINISHED:  # aborted, or stopped on the token before: this one is dropped
                continue
            seq.token_ids[position] = token  # the next step's pending token may follow it
            seq.output_logprobs.append(logprob)
            if row in tops:
                seq.output_top_logprobs.append(tops[row])
            if row in named:
                seq.output_token_ids_logprobs.append(named[row])
            seq.output_versions.append(launched.weight_version)
            if seq.on_update is not None:
                updates.append(seq)
            if self.stops.check(seq, position):
                del seq.token_ids[position + 1 :]
                self._retire(seq, done)
        page_size = self.blocks.page_size
        for seq in launched.batch.seqs:  # every computed token is known now (a pending one is never computed)
            if seq.finish is None and seq.num_computed // page_size > seq.num_registered:  # a page filled
                self.blocks.register_computed(seq)
        self.stats.record(launched.batch, launched.launch_s, synced - started, time.perf_counter() - synced)

    def _retire(self, seq: Sequence, done: list[Sequence]) -> None:
        while seq.has_pending_token:  # launched but not read back: dropped
            seq.token_ids.pop()
        seq.finishing = False
        if seq.pages:  # its full output pages serve a later turn that starts with this conversation
            self.blocks.register_computed(seq)
        self.scheduler.finish(seq)
        with self._cond:
            seqs = self._by_rid.get(seq.rid, [])
            if seq in seqs:
                seqs.remove(seq)
            if not seqs:
                self._by_rid.pop(seq.rid, None)
        done.append(seq)

    def _abort_everything(self) -> None:
        done: list[Sequence] = []
        with self._step_lock:
            if self._in_flight is not None and self._in_flight.readback is not None:
                self._in_flight.readback.result()  # the device is done with the pool before shutdown frees it
            self._in_flight = None
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                seq.finish = FinishReason.ABORT
                self._retire(seq, done)
        self._notify(done, [])

    def _drop_everything(self) -> list[Sequence]:
        failed = list(self.scheduler.running) + list(self.scheduler.waiting)
        for seq in failed:
            self.scheduler.finish(seq)
            with self._cond:
                self._by_rid.pop(seq.rid, None)
        return failed

    def _notify(self, done: list[Sequence], updates: list[Sequence]) -> None:
        for seq in updates:
            count = len(seq.output_logprobs)  # tokens read back (a pending one may follow them)
            new_ids = seq.output_ids[seq.num_reported : count]
            new_logprobs = seq.output_logprobs[seq.num_reported : count]
            new_top = seq.output_top_logprobs[seq.num_reported : count]
            new_named = seq.output_token_ids_logprobs[seq.num_reported : count]
            first = seq.num_reported == 0
            seq.num_reported = count
            if not new_ids:
                continue
            if first and seq.on_input_logprobs is not None:  # the prompt is scored before any token is sampled
                _call(seq.on_input_logprobs, *_input_logprobs(seq))
            _call(seq.on_update, new_ids, new_logprobs, new_top, new_named)
        for seq in done:
            _call(seq.on_done, self._result(seq))

    def _result(self, seq: Sequence) -> GenerateResult:
        params = seq.request.sampling_params
        if not isinstance(seq.matched_stop, str) and self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens)
        input_logprobs, input_top_logprobs, input_token_ids_logprobs = _input_logprobs(seq)
        return GenerateResult(
            rid=seq.rid,
            output_ids=list(seq.output_ids),
            output_logprobs=list(seq.output_logprobs) if seq.request.return_logprob else [],
            finish_reason=seq.finish or FinishReason.ABORT,
            weight_version=self.weight_version,
            prompt_tokens=seq.num_prompt_tokens,
            text=seq.text,
            matched_stop=seq.matched_stop,
            cached_tokens=seq.cached_tokens,
            weight_versions=list(seq.output_versions),
            output_top_logprobs=list(seq.output_top_logprobs),
            input_logprobs=input_logprobs,
            input_top_logprobs=input_top_logprobs,
            output_token_ids_logprobs=list(seq.output_token_ids_logprobs),
            input_token_ids_logprobs=input_token_ids_logprobs,
        )


@dataclass
class _Launched:
    """A step on the device: its batch, the sequences it samples for and where their pending tokens sit."""

    batch: ScheduledBatch
    seqs: list[Sequence]
    positions: list[int]  # index in token_ids of each sequence's pending token
    readback: Readback | None  # None when the step samples nothing (prefill chunks only)
    weight_version: int
    launch_s: float
    prompt_scores: PromptScores | None = None  # logprobs of prompt positions this step scores
    prompts_done: list[Sequence] = field(default_factory=list)  # max_new_tokens 0 requests whose prompt is computed


def _input_logprob_start(request: GenerateRequest, num_prompt_tokens: int) -> int:
    """The first prompt position to report (-1: none), or ValueError for one past the prompt (as SGLang refuses
    it). SGLang's default -1 reports the last prompt token alone (a None entry, nothing to compute), and nothing
    for a request that generates no token."""
    start = request.logprob_start_len
    if start < -1:
        raise ValueError(f"logprob_start_len must be -1 (the default) or a prompt position >= 0; got {start}")
    if start >= num_prompt_tokens:
        raise ValueError(f"logprob_start_len ({start}) must be less than the number of input tokens "
                         f"({num_prompt_tokens}); use a smaller logprob_start_len")
    if not request.return_logprob:
        if start >= 0:
            raise ValueError("logprob_start_len asks for prompt logprobs, which come with return_logprob")
        return -1
    if start == -1:
        return -1 if request.sampling_params.max_new_tokens == 0 else num_prompt_tokens - 1
    return start


def _input_logprobs(seq: Sequence) -> tuple[list[float | None], list[TopLogprobs | None], list[list[float] | None]]:
    """SGLang's input logprob lists: None for the start position itself, then one value per scored token (the top
    candidates and the named ids' logprobs only for a request that asks for them)."""
    if seq.input_logprob_start < 0:
        return [], [], []
    tops = [None, *seq.input_top_logprobs] if seq.request.top_logprobs_num else []
    named = [None, *seq.input_token_ids_logprobs] if seq.request.token_ids_logprob else []
    return [None, *seq.input_logprobs], tops, named


def _check_token_ids_logprob(request: GenerateRequest, vocab: int) -> None:
    """The named ids: a list of ints in the vocabulary, asked with return_logprob (ValueError otherwise)."""
    ids = request.token_ids_logprob
    if ids is None:
        return
    if not isinstance(ids, list) or any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
        raise ValueError(f"token_ids_logprob must be a list of token ids (ints); got {ids!r:.200}")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"token_ids_logprob: token id {bad} is outside the vocabulary [0, {vocab})")
    if ids and not request.return_logprob:
        raise ValueError("token_ids_logprob comes with the token logprobs: set return_logprob")


def _attention_backend(device: torch.device, head_dim: int) -> tuple[Callable, bool]:
    """The paged attention function for this device and head size, and whether decode may use CUDA graphs."""
    from sluice.engine.attention import reference

    if device.type != "cuda":
        return reference.paged_attention, False
    from sluice.engine.attention import triton_backend

    if triton_backend.supports_head_dim(head_dim):
        return triton_backend.paged_attention, True
    # The reference gathers every page up to max_seqlen_k; inside a graph that is the whole context: eager only.
    warnings.warn(f"head_dim {head_dim} is not supported by the Triton kernels; using the PyTorch reference "
                  "attention without CUDA graphs (slower)", stacklevel=2)
    return reference.paged_attention, False


def _call(callback: Callable, *args) -> None:
    """Run a caller's callback; one that raises must not kill the worker (its caller is already gone)."""
    try:
        callback(*args)
    except Exception:  # noqa: BLE001
        pass
