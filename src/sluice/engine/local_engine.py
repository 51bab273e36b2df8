"""The in-process engine: a worker thread runs batched generation over a causal LM.

Requests queue up; the worker takes up to ``max_running_requests`` of them, prefills them together
(left-padded) and decodes until each finishes. Weight updates, pause and abort take effect between decode
steps, never inside one: ``_step_lock`` guards the model during a forward pass.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from sluice.config import EngineConfig
from sluice.device import resolve_device, resolve_dtype
from sluice.engine.protocol import FinishReason, GenerateRequest, GenerateResult, NamedTensors
from sluice.engine.sampler import sample_tokens
from sluice.engine.weights import load_weights


# transformers >= 5.2x renames the forward argument `past_key_values` to `cache`; the old name keeps working
# in every version we support (>= 5.17), so keep it and silence the notice.
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)


@dataclass
class _Running:
    request: GenerateRequest
    on_done: Callable[[GenerateResult], None]
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None
    matched_stop: int | str | None = None
    text: str = ""
    abort_requested: bool = False  # set by abort(), under _cond; honoured before the next decode step


class LocalEngine:
    def __init__(self, model_path: str, config: EngineConfig = EngineConfig()):
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()
        self.max_running_requests = config.max_running_requests
        self.context_len = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.eos_ids = _eos_ids(self.model.config.eos_token_id, self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.weight_version = 0
        self._waiting: list[_Running] = []
        self._running: list[_Running] = []  # the batch being decoded; set and cleared under _cond
        self._paused = False
        self._closed = False
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self._worker = threading.Thread(target=self._loop, name="sluice-engine", daemon=True)
        self._worker.start()

    # ---- control (any thread) -------------------------------------------------------------------
    def submit(self, request: GenerateRequest, on_done: Callable[[GenerateResult], None]) -> None:
        seed = request.sampling_params.seed
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is shut down")
            self._waiting.append(_Running(request, on_done, generator))
            self._cond.notify_all()

    def update_weights(self, weights: NamedTensors | str, version: int) -> int:
        """Load new weights between decode steps; returns the number of tensors copied."""
        with self._step_lock:
            count = load_weights(self.model, weights)
            self.weight_version = version
        return count

    def abort(self, rid: str | None = None) -> None:
        """Abort the submitted requests (all, or those with this rid); later submissions are not affected."""
        with self._cond:
            for entry in self._waiting + self._running:
                if rid is None or entry.request.rid == rid:
                    entry.abort_requested = True
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # ---- worker thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._waiting and not self._paused))
                if self._closed:
                    batch, self._waiting = self._waiting, []
                else:
                    batch = self._waiting[: self.max_running_requests]
                    self._waiting = self._waiting[len(batch) :]
                    self._running = batch
            if self._closed:
                for entry in batch:
                    entry.finish = FinishReason.ABORT
                    self._deliver(entry)
                return
            try:
                self._generate_batch(batch)
            except Exception as error:  # a failed batch must not hang its callers
                for entry in batch:
                    _notify(entry, error)
            finally:
                with self._cond:
                    self._running = []

    def _check_control(self, running: list[_Running]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._paused or self._closed)
            for entry in running:
                if entry.finish is None and (entry.abort_requested or self._closed):
                    entry.finish = FinishReason.ABORT

    @torch.no_grad()
    def _generate_batch(self, running: list[_Running]) -> None:
        prompts = [entry.request.input_ids for entry in running]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding keeps every row's next token in the last column
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        params = [entry.request.sampling_params for entry in running]
        generators = [entry.generator for entry in running]
        step_input, step_positions = input_ids, positions
        while True:
            self._check_control(running)
            with self._step_lock:
                if all(entry.finish is not None for entry in running):
                    break
                logits = self.model(
                    input_ids=step_input, attention_mask=attention_mask, position_ids=step_positions,
                    past_key_values=cache, use_cache=True,
                ).logits[:, -1]
                tokens, logprobs = sample_tokens(logits, params, generators)
            for entry, token, logprob in zip(running, tokens.tolist(), logprobs.tolist()):
                if entry.finish is None:
                    self._append_token(entry, token, logprob)
            if all(entry.finish is not None for entry in running):
                break
            step_input = tokens[:, None]
            step_positions = step_positions[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(running), 1))], dim=1)
        for entry in running:
            self._deliver(entry)

    def _append_token(self, entry: _Running, token: int, logprob: float) -> None:
        params = entry.request.sampling_params
        entry.output_ids.append(token)
        entry.output_logprobs.append(logprob)
        if not params.ignore_eos and token in self.eos_ids:
            entry.finish, entry.matched_stop = FinishReason.STOP, token
        elif token in params.stop_token_ids:
            entry.finish, entry.matched_stop = FinishReason.STOP, token
        elif params.stop and self._match_stop_string(entry):
            entry.finish = FinishReason.STOP
        elif len(entry.output_ids) >= params.max_new_tokens:
            entry.finish = FinishReason.LENGTH
        elif len(entry.request.input_ids) + len(entry.output_ids) >= self.context_len:
            entry.finish = FinishReason.LENGTH

    def _match_stop_string(self, entry: _Running) -> bool:
        text = self.tokenizer.decode(entry.output_ids, skip_special_tokens=False)
        hits = [(text.find(stop), stop) for stop in entry.request.sampling_params.stop if stop in text]
        if not hits:
            return False
        position, stop = min(hits)
        entry.text, entry.matched_stop = text[:position], stop
        return True

    def _deliver(self, entry: _Running) -> None:
        params = entry.request.sampling_params
        if not isinstance(entry.matched_stop, str):
            entry.text = self.tokenizer.decode(entry.output_ids, skip_special_tokens=params.skip_special_tokens)
        _notify(
            entry,
            GenerateResult(
                rid=entry.request.rid,
                output_ids=entry.output_ids,
                output_logprobs=entry.output_logprobs if entry.request.return_logprob else [],
                finish_reason=entry.finish or FinishReason.ABORT,
                weight_version=self.weight_version,
                prompt_tokens=len(entry.request.input_ids),
                text=entry.text,
                matched_stop=entry.matched_stop,
            ),
        )


def _eos_ids(config_eos: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    ids = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(tokenizer_eos)
    return ids


def _notify(entry: _Running, outcome) -> None:
    """Hand a result (or an error) to the request's callback; a failing callback must not kill the worker."""
    try:
        entry.on_done(outcome)
    except Exception:  # noqa: BLE001 - the callback belongs to a caller that is already gone
        pass
