"""Request bodies of the OpenAI-compatible API (/v1/completions, /v1/chat/completions), validated strictly.

Besides OpenAI's fields, the sampling extensions vLLM and SGLang accept (``top_k``, ``min_p``, ``ignore_eos``,
``stop_token_ids``, ...) are taken, since RL clients use them. OpenAI options the engine does not implement
are accepted only at their neutral value. Token ids always come back (``token_ids``, ``prompt_token_ids``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sluice.engine.server.native_schema import SEED_MAX, SEED_MIN, STRICT, check_stop, check_top_k, require_neutral
from sluice.types import SamplingParams

OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

_NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "logit_bias": None, "best_of": None,
            "suffix": None, "tools": None, "repetition_penalty": 1.0, "min_tokens": 0, "regex": None,
            "json_schema": None, "ebnf": None, "return_hidden_states": False, "lora_path": None}


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False


class OpenAIRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = STRICT

    model: str | None = None  # one model is served; any name is accepted, the response names the served one
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM / SGLang)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0, le=1)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[int] | None = None
    no_stop_trim: bool = False
    return_token_ids: bool = True  # accepted for vLLM clients; token ids are always returned
    rid: str | None = None  # request id for /abort_request; choice k of several gets "{rid}-{k}"
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    lora_path: str | None = None
    # SGLang fields that sglang-router always sends
    return_hidden_states: bool = False
    separate_reasoning: bool = True  # no effect: no reasoning parser, the text comes back whole
    stream_reasoning: bool = True  # no effect, as above

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        return check_top_k(value)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return check_stop(value)

    @field_validator(*_NEUTRAL, check_fields=False)
    @classmethod
    def _neutral_only(cls, value, info: ValidationInfo):
        return require_neutral(value, _NEUTRAL[info.field_name])

    @model_validator(mode="after")
    def _consistent(self) -> "OpenAIRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream true")
        if self.seed is not None and self.seed + self.n - 1 > SEED_MAX:  # choice i is seeded with seed + i
            raise ValueError(f"seed: with n={self.n}, seed + n - 1 must be at most {SEED_MAX}; got {self.seed}")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def wanted_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        """The field that set the token limit, for error messages."""
        return "max_tokens"

    @property
    def top_logprobs_num(self) -> int:
        """Alternatives asked for at each output token."""
        return 0

    @property
    def logprob_start_len(self) -> int:
        """First prompt position the engine scores; -1: none besides SGLang's default (chat never echoes)."""
        return -1

    @property
    def top_logprobs_field(self) -> str:
        return "top_logprobs"

    def sampling_params(self, room: int, index: int) -> SamplingParams:
        """Settings of the ``index``-th choice; ``room`` (context left) caps an unset max_tokens.

        With a seed, choice i uses seed + i: the choices stay reproducible without being identical.
        """
        max_new = self.wanted_max_tokens()
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            max_new_tokens=max_new if max_new is not None else room, stop=self.stop_list,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, seed=None if self.seed is None else self.seed + index,
        )


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 with echo scores a prompt: its tokens' logprobs and no completion (as vLLM serves it)
    max_tokens: int | None = Field(OPENAI_DEFAULT_MAX_TOKENS, ge=0)
    logprobs: int | None = Field(None, ge=0)
    # the prompt is put before the completion's text (and, with logprobs, its tokens' logprobs); streamed, in each
    # choice's first chunk
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def top_logprobs_num(self) -> int:
        return self.logprobs or 0

    @property
    def top_logprobs_field(self) -> str:
        return "logprobs"

    @property
    def logprob_start_len(self) -> int:
        """The engine scores the whole prompt for echo with logprobs; -1 (its default) otherwise."""
        return 0 if self.echo and self.logprobs is not None else -1

    def prompts(self) -> list[tuple[str, str | list[int]]]:
        """(field, text or token ids) per prompt."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [("prompt", self.prompt)]
        return [(f"prompt[{i}]", p) for i, p in enumerate(self.prompt)] or [("prompt", [])]


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, reasoning_content, ...) go to the chat template untouched.
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    chat_template_kwargs: dict | None = None  # e.g. {"enable_thinking": false}
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _top_with_logprobs(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs true")
        return self

    @property
    def top_logprobs_num(self) -> int:
        return self.top_logprobs or 0

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        if value not in (None, {"type": "text"}):
            raise ValueError("only {\"type\": \"text\"} is supported")
        return None

    def wanted_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
