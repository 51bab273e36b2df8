"""Request bodies of SGLang's native API, validated at the boundary (strict types, unknown keys refused).

SGLang options our engine does not implement (penalties, constrained decoding, ...) are declared so that a
client sending their neutral value still works, and any other value is refused by name rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sluice.net.http_errors import RequestError
from sluice.types import SamplingParams

# NaN and infinities are refused: Python's json module reads them, and a NaN passes no bound check.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128
# Seeds seed a torch generator, which takes a 64-bit integer; vLLM bounds its seed the same way.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# SGLang sampling options kept only at these values: anything else would silently change the distribution.
UNSUPPORTED_SAMPLING = {
    "n": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0,
    "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None, "stop_regex": None,
    "logit_bias": None, "custom_params": None,
}


def require_neutral(value, neutral):
    """For options the engine does not implement: the neutral value passes, anything else is refused."""
    if value != neutral and value not in ({}, []):
        raise ValueError(f"{value!r} is not supported by sluice's engine (only {neutral!r})")
    return value

# Fields of SGLang's GenerateReqInput for features our engine lacks (multimodal, LoRA, hidden states,
# disaggregation, ...); sglang-router fills several of them in with these neutral values on every request.
UNSUPPORTED_GENERATE = {
    "return_hidden_states": False, "return_entropy": False, "return_bytes": False, "return_routed_experts": False,
    "background": False, "lora_path": None, "image_data": None, "audio_data": None, "video_data": None,
    "session_params": None, "custom_logit_processor": None, "bootstrap_host": None,
    "bootstrap_port": None, "bootstrap_room": None,
}



def check_top_k(value: int) -> int:
    """top_k: -1 (no cut) or a positive count; shared by the native and OpenAI request schemas."""
    if value != -1 and value < 1:
        raise ValueError("must be -1 (no cut) or at least 1")
    return value


def check_stop(value):
    """stop: a string or a list of non-empty strings."""
    if any(not s for s in ([value] if isinstance(value, str) else value or [])):
        raise ValueError("stop strings must not be empty")
    return value

class WireSamplingParams(BaseModel):
    """SGLang's ``sampling_params`` object."""

    model_config = STRICT

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0, le=1)
    # None: up to the context length; 0: the prompt is computed (and scored with logprob_start_len), nothing sampled
    max_new_tokens: int | None = Field(SGLANG_DEFAULT_MAX_NEW_TOKENS, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Fast tokenizers never put spaces between special tokens, so both values decode the same.
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    stop_regex: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    custom_params: dict | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        return check_top_k(value)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return check_stop(value)

    @field_validator(*UNSUPPORTED_SAMPLING)
    @classmethod
    def _neutral_only(cls, value, info: ValidationInfo):
        return require_neutral(value, UNSUPPORTED_SAMPLING[info.field_name])

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def to_sampling_params(self, max_new_tokens_cap: int) -> SamplingParams:
        """Our engine's record; ``max_new_tokens_cap`` (room left in the context) replaces a None limit and bounds
        the default one: as in SGLang, only a limit the client gave is checked against the context."""
        if self.max_new_tokens is None:
            max_new_tokens = max_new_tokens_cap
        elif "max_new_tokens" not in self.model_fields_set:
            max_new_tokens = min(self.max_new_tokens, max_new_tokens_cap)
        else:
            max_new_tokens = self.max_new_tokens
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            max_new_tokens=max_new_tokens,
            stop=self.stop_list, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, seed=self.sampling_seed,
        )


class GenerateBody(BaseModel):
    """``POST /generate``: one prompt, or a batch (lists of prompts, optionally per-prompt parameters)."""

    model_config = STRICT

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: WireSamplingParams | list[WireSamplingParams] = Field(default_factory=WireSamplingParams)
    return_logprob: bool | list[bool] = False
    # with return_logprob: meta_info.input_token_logprobs from this prompt position on (its own entry None, as in
    # SGLang); -1: the last prompt token only (nothing with max_new_tokens 0). Must be less than the prompt length.
    logprob_start_len: int | list[int] = -1
    # with return_logprob: meta_info.output_top_logprobs (and input_top_logprobs over the same prompt positions)
    top_logprobs_num: int | list[int] = 0
    # with return_logprob: meta_info.output_token_ids_logprobs, the logprobs of these ids at each output position
    # (and input_token_ids_logprobs over the prompt positions of input_token_logprobs); a batch takes one list for
    # every prompt or a list per prompt. An empty list asks for nothing (SGLang's neutral value).
    token_ids_logprob: list[int] | list[list[int]] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    model: str | None = None  # one model is served; the name is not checked
    log_metrics: bool = True  # no effect: the engine keeps no per-request metrics log
    no_logs: bool = False  # no effect: requests are not logged
    data_parallel_rank: Literal[0] | None = None  # one rank per server
    return_hidden_states: bool = False
    return_entropy: bool = False
    return_bytes: bool = False
    return_routed_experts: bool = False
    background: bool = False
    lora_path: Any = None
    image_data: Any = None
    audio_data: Any = None
    video_data: Any = None
    session_params: Any = None
    custom_logit_processor: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None

    @field_validator(*UNSUPPORTED_GENERATE)
    @classmethod
    def _neutral_only(cls, value, info: ValidationInfo):
        return require_neutral(value, UNSUPPORTED_GENERATE[info.field_name])

    @model_validator(mode="after")
    def _one_prompt_field(self) -> "GenerateBody":
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        return self

    @property
    def is_batch(self) -> bool:
        prompts = self.text if self.text is not None else self.input_ids
        return isinstance(self.text, list) or (bool(prompts) and isinstance(prompts[0], list))

    def items(self) -> list["GenerateItem"]:
        """One item per prompt, with per-item fields broadcast; refuses lists whose lengths disagree."""
        field = "text" if self.text is not None else "input_ids"
        prompts = getattr(self, field) if self.is_batch else [getattr(self, field)]
        if self.is_batch and self.stream:
            raise RequestError("stream", "streaming takes one prompt, not a batch")
        count = len(prompts)
        if count == 0:
            raise RequestError(field, "the batch is empty")
        params = _per_item(self.sampling_params, count, "sampling_params")
        logprob = _per_item(self.return_logprob, count, "return_logprob")
        rids = _per_item(self.rid, count, "rid")
        tops = _per_item(self.top_logprobs_num, count, "top_logprobs_num")
        starts = _per_item(self.logprob_start_len, count, "logprob_start_len")
        named = self._named_ids(count)
        items = []
        for i in range(count):
            top_field = _item_field("top_logprobs_num", self.top_logprobs_num, i)
            start_field = _item_field("logprob_start_len", self.logprob_start_len, i)
            _check_top_logprobs(top_field, tops[i], logprob[i])
            if starts[i] < -1:
                raise RequestError(start_field, f"must be -1 (the default) or a prompt position >= 0, got {starts[i]}")
            if starts[i] >= 0 and not logprob[i]:  # SGLang ignores it then: refused here, not dropped
                raise RequestError(start_field, "prompt logprobs come with the token logprobs: set return_logprob true")
            items.append(GenerateItem(f"{field}[{i}]" if self.is_batch else field, prompts[i], params[i], logprob[i],
                                      rids[i], _item_field("sampling_params", self.sampling_params, i), tops[i],
                                      top_field, starts[i], start_field, named[i], self._named_field(i)))
            if named[i] and not logprob[i]:  # SGLang ignores them then: refused here, not dropped
                raise RequestError(self._named_field(i), "token id logprobs come with the token logprobs: set "
                                                         "return_logprob true")
        return items

    def _named_ids(self, count: int) -> list[list[int] | None]:
        """token_ids_logprob per prompt: one flat list is shared by every prompt, a list of lists is per prompt."""
        ids = self.token_ids_logprob
        if not ids:
            return [None] * count
        if not isinstance(ids[0], list):
            return [list(ids)] * count
        if not self.is_batch:
            raise RequestError("token_ids_logprob", "one prompt takes a list of token ids, not a list of lists")
        return [list(each) or None for each in _per_item(ids, count, "token_ids_logprob")]

    def _named_field(self, index: int) -> str:
        ids = self.token_ids_logprob
        return f"token_ids_logprob[{index}]" if ids and isinstance(ids[0], list) else "token_ids_logprob"


def _item_field(name: str, value, index: int) -> str:
    """Where item ``index``'s value of a per-item field sits: ``name[index]`` for a list, ``name`` if shared."""
    return f"{name}[{index}]" if isinstance(value, list) else name


def _check_top_logprobs(field: str, count: int, return_logprob: bool) -> None:
    """Top logprobs come with ``return_logprob`` (SGLang ignores them without it: refused here, not dropped)."""
    if count < 0:
        raise RequestError(field, f"must be >= 0, got {count}")
    if count and not return_logprob:
        raise RequestError(field, "top logprobs come with the token logprobs: set return_logprob true")


@dataclass
class GenerateItem:
    """One prompt of a /generate call, before tokenization."""

    field: str  # where the prompt sits in the body, for error messages
    prompt: str | list[int]
    sampling_params: WireSamplingParams
    return_logprob: bool
    rid: str | None
    params_field: str  # where its sampling_params sit in the body
    top_logprobs_num: int
    top_logprobs_field: str
    logprob_start_len: int = -1
    logprob_start_field: str = "logprob_start_len"
    token_ids_logprob: list[int] | None = None  # ids whose logprobs are reported at each position; None: none
    token_ids_field: str = "token_ids_logprob"


def _per_item(value, count: int, name: str) -> list:
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise RequestError(name, f"{len(value)} entries for {count} prompts")
    return value


class AbortBody(BaseModel):
    model_config = STRICT
    rid: str = ""
    abort_all: bool = False


class PauseBody(BaseModel):
    """SGLang's modes: ``abort`` (default) aborts in-flight requests; ``in_place``/``retract`` keep them waiting."""

    model_config = STRICT
    mode: Literal["abort", "in_place", "retract"] = "abort"


class MemoryBody(BaseModel):
    model_config = STRICT
    tags: list[str] | None = None  # SGLang releases weights and KV cache by tag; ours releases both together


class DiskUpdateBody(BaseModel):
    model_config = STRICT
    model_path: str
    weight_version: str | int | None = None  # None keeps the current version, as SGLang does
    load_format: str | None = None
    abort_all_requests: bool = False
    flush_cache: bool = True  # our engine always drops cached prefixes computed with the old weights
    # sluice extension: each tensor's checksum (weights/buckets.py) by name; checked before any is applied
    checksums: dict[str, int] | None = None


class InitGroupBody(BaseModel):
    model_config = STRICT
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)  # rank 0 is the trainer that broadcasts
    world_size: int = Field(ge=2)
    group_name: str = "weight_update_group"
    backend: Literal["gloo", "nccl"] = "nccl"
    # sluice extension: seconds to wait for every rank to join, and for each later collective of the group
    timeout_s: float | None = Field(None, gt=0)


class _BucketedUpdate(BaseModel):
    """What the two bucketed weight routes share: per-tensor checksums and a bucket's place in its version."""

    model_config = STRICT
    checksums: list[int] | None = None
    bucket_index: int | None = Field(None, ge=0)
    num_buckets: int | None = Field(None, ge=1)

    def _check_layout(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> None:
        if not (len(names) == len(dtypes) == len(shapes)):
            raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
        if self.checksums is not None and len(self.checksums) != len(names):
            raise ValueError(f"checksums: {len(self.checksums)} checksums for {len(names)} names")

    @property
    def is_bucketed(self) -> bool:
        return self.bucket_index is not None

    @property
    def is_last_bucket(self) -> bool:
        return self.bucket_index is None or self.bucket_index == self.num_buckets - 1


class DistributedUpdateBody(_BucketedUpdate):
    """SGLang's fields, then sluice's extensions (a real SGLang server refuses those; our client sends them to
    sluice engines only):

    - ``load_format: "flattened_bucket"``: the trainer broadcasts the bucket as one byte buffer (one collective)
      laid out by ``weights.buckets.bucket_layout``, instead of one broadcast per tensor.
    - ``checksums``: one per name (the sums of weights/buckets.py); a bucket that does not match is refused, naming the
      tensor, and nothing of its version is applied.
    - ``bucket_index``/``num_buckets``: this call is one bucket of ``weight_version``; buckets are held back and
      applied together after the last one (engine/server/weight_staging.py), so generation never sees half a version.
    """

    model_config = STRICT
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    weight_version: str | int | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    load_format: Literal["flattened_bucket"] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> "DistributedUpdateBody":
        self._check_layout(self.names, self.dtypes, self.shapes)
        check_bucket_fields(self.bucket_index, self.num_buckets, self.weight_version)
        return self


def check_bucket_fields(bucket_index: int | None, num_buckets: int | None, weight_version) -> None:
    """Our bucket extension: both fields or neither, the index inside the count, the version named."""
    if (bucket_index is None) != (num_buckets is None):
        raise ValueError("bucket_index: give both bucket_index and num_buckets, or neither")
    if bucket_index is not None:
        if bucket_index >= num_buckets:
            raise ValueError(f"bucket_index: {bucket_index} is outside {num_buckets} buckets")
        if weight_version is None:
            raise ValueError("weight_version: a bucketed update names the version it belongs to")


class TensorUpdateBody(_BucketedUpdate):
    """``POST /update_weights_from_tensor``: SGLang's fields, then sluice's extensions.

    ``serialized_named_tensors``: one entry per tensor-parallel rank (our engine has one and reads entry 0), each
    the base64 of a pickle holding CUDA IPC handles, read only through weights/ipc.py's restricted
    unpickler. SGLang's form: a list of (name, tensor) pairs, made with torch's multiprocessing reductions,
    applied at once. Our extensions:

    - ``load_format: "flattened_bucket"``: the payload is one uint8 tensor, the bucket's flat buffer, laid out by
      ``weights.buckets.bucket_layout`` from ``names``, ``dtypes`` and ``shapes`` (one IPC handle per bucket).
    - ``checksums``: one per tensor, in order (the sums of weights/buckets.py); checked before any weight becomes visible.
    - ``bucket_index``/``num_buckets`` (flattened form only): this call is one bucket of ``weight_version``;
      buckets are held back and applied together after the last one (engine/server/weight_staging.py).
    """

    model_config = STRICT
    serialized_named_tensors: list[str] = Field(min_length=1)
    load_format: Literal["flattened_bucket"] | None = None
    flush_cache: bool = True  # our engine always drops cached prefixes computed with the old weights
    abort_all_requests: bool = False
    weight_version: str | int | None = None  # None keeps the current version, as SGLang does
    names: list[str] | None = None
    dtypes: list[str] | None = None
    shapes: list[list[int]] | None = None

    @model_validator(mode="after")
    def _forms(self) -> "TensorUpdateBody":
        layout = {"names": self.names, "dtypes": self.dtypes, "shapes": self.shapes}
        if self.load_format is None:
            given = next((field for field, value in layout.items() if value is not None), None)
            if given is not None:
                raise ValueError(f"{given}: the per-tensor form carries names in its payload; the layout fields "
                                 "go with load_format flattened_bucket")
            if self.bucket_index is not None:
                raise ValueError("bucket_index: bucketed updates take load_format flattened_bucket")
            return self
        missing = next((field for field, value in layout.items() if value is None), None)
        if missing is not None:
            raise ValueError(f"{missing}: load_format flattened_bucket needs names, dtypes and shapes")
        self._check_layout(self.names, self.dtypes, self.shapes)
        check_bucket_fields(self.bucket_index, self.num_buckets, self.weight_version)
        return self


class DestroyGroupBody(BaseModel):
    model_config = STRICT
    group_name: str = "weight_update_group"
