"""Request bodies of the OpenAI API (`/v1/completions`, `/v1/chat/completions`).

OpenAI's fields this engine cannot honour are accepted only at their neutral value; a few
fields vLLM and SGLang add (top_k, min_p, min_tokens, ignore_eos, stop_token_ids,
skip_special_tokens) are accepted too.
"""

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from integrations.http.protocol import MAX_N, StopString, Strict, Temperature, TokenId
from rollout import SamplingParams
from rollout.sampling_params import MAX_TOP_LOGPROBS


class StreamOptions(Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(
        False, description="with include_usage, vLLM's usage of the chunk's sample in every "
                           "chunk (its prompt's tokens and the sample's tokens so far)")


class _Sampling(Strict):
    model: str
    temperature: Temperature = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int = Field(-1, ge=-1, description="-1 (or 0) is off")
    min_p: float = Field(0.0, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = Field(True, description="only True: text skips special tokens")

    @field_validator("temperature", "top_p", "n", "stream", "presence_penalty",
                     "frequency_penalty", "top_k", "min_p", "min_tokens", "ignore_eos",
                     "skip_special_tokens", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        """OpenAI types these 'or null' (its client sends null for a None argument): null
        means the default."""
        if value is None:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported by this engine; send 0 or leave it out")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported by this engine")
        return value

    @field_validator("skip_special_tokens")
    @classmethod
    def _skipped(cls, value: bool) -> bool:
        if not value:
            raise ValueError("only true is supported here; /generate keeps special tokens")
        return value

    @model_validator(mode="after")
    def _streamed(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def engine_params(self, max_tokens: int | None, top_logprobs: int,
                      logprobs: bool) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            min_p=self.min_p, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, n=self.n,
            seed=self.seed, logprobs=logprobs, top_logprobs=top_logprobs)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="log-probs of the sampled tokens and this many "
                                             "alternatives")
    echo: Literal[False] | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: None = None

    @model_validator(mode="after")
    def _consistent(self):
        if not self.prompt:
            raise ValueError("prompt is empty")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) other than n ({self.n}) is not "
                             "supported")
        if self.min_tokens > (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                             f"({self.max_tokens})")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    def sampling(self) -> SamplingParams:
        return self.engine_params(self.max_tokens, self.logprobs or 0, self.logprobs is not None)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # a tool message's
    tool_calls: list[dict[str, Any]] | None = None  # an assistant message's, for the template
    # the rest of an answer's message, as a client sends it back (model_dump()): null only
    refusal: None = None
    function_call: None = None
    audio: None = None
    annotations: None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        message = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "tool_calls"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ResponseFormat(Strict):
    type: Literal["text"] = Field(description="only text: no structured output here")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # at their neutral values (no tools, plain text); stored completions do not apply here
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        limit = self.limit
        if limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= the token limit "
                             f"({limit})")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self) -> SamplingParams:
        return self.engine_params(self.limit, self.top_logprobs or 0, bool(self.logprobs))
