"""Request bodies of SGLang's native API, as slime and SGLang's router send them.

Every model refuses unknown fields and wrong types by name (pydantic's strict mode, no NaN or
infinity). Fields SGLang has but this engine does not support are accepted only at the value
that means "off", so a client learns which one it must drop.
"""

from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, field_validator,
                      model_validator)

from rollout.sampling_params import MAX_TOP_LOGPROBS, MIN_TEMPERATURE

MAX_N = 1024  # samples per prompt; a bound on what one request may queue
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # cuda_graph: accepted, nothing to do

TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1)]


def _temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE} (got {value})")
    return value


Temperature = Annotated[float, Field(ge=0), AfterValidator(_temperature)]


def _unicode(value, where: str):
    """JSON may carry lone surrogates ("\\ud800"), which are not text: no tokenizer takes
    them and no answer can encode them back (a rid or weight version holding one made the
    answers to every client an HTTP 500). Refused in every string, by name."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{where} is not valid Unicode text (a lone surrogate: {value!r})")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _unicode(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _unicode(key, where)
            _unicode(item, where)
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _text(cls, value, info):
        return _unicode(value, info.field_name)


class SglSamplingParams(Strict):
    """SGLang's `sampling_params`."""
    max_new_tokens: int | None = Field(128, ge=0, description="0: no generation (scoring only)")
    min_new_tokens: int = Field(0, ge=0)
    temperature: Temperature = Field(1.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 (or 0) is off")
    min_p: float = Field(0.0, ge=0, le=1)
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = Field(False, description="keep the matched stop token or string")
    spaces_between_special_tokens: bool = Field(True, description="accepted; fast tokenizers "
                                                "ignore it, as in transformers")
    n: int = Field(1, ge=1, le=MAX_N)
    sampling_seed: int | None = Field(None, ge=0, lt=2**63)
    custom_params: dict | None = Field(None, description="accepted and ignored")
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @field_validator("frequency_penalty", "presence_penalty", "repetition_penalty")
    @classmethod
    def _neutral(cls, value: float, info) -> float:
        neutral = 1.0 if info.field_name == "repetition_penalty" else 0.0
        if value != neutral:
            raise ValueError(f"penalties are not supported by this engine; send {neutral} "
                             "or leave it out")
        return value

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= "
                             f"max_new_tokens ({self.max_new_tokens})")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


Prompt = str | list[int]


class GenerateRequest(Strict):
    """`POST /generate`: one prompt (answered with an object) or a batch (a list, in order)."""
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"input_ids": [1, 2, 3], "return_logprob": True,
         "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
        {"text": ["Hello", "Hi"], "sampling_params": {"max_new_tokens": 8, "n": 2,
                                                      "sampling_seed": 1}}]})
    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
    sampling_params: SglSamplingParams | list[SglSamplingParams] = Field(
        default_factory=SglSamplingParams)
    rid: str | list[str] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    logprob_start_len: int | None = Field(
        None, ge=-1, description="with return_logprob: input_token_logprobs from this prompt "
                                 "position on (-1: none)")
    return_text_in_logprobs: bool = False
    stream: bool = False
    # SGLang's router sends these with its defaults
    log_metrics: bool = True
    no_logs: bool = False
    return_hidden_states: Literal[False] = False
    background: Literal[False] = False
    return_bytes: Literal[False] = False
    return_entropy: Literal[False] = False

    @field_validator("sampling_params", "return_logprob", "top_logprobs_num", "stream",
                     mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        """SGLang types these Optional: null means the default."""
        if value is None:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        prompts, batch = self.prompts()
        if batch and not prompts:
            raise ValueError("the batch of prompts is empty")
        for name in ("sampling_params", "rid"):
            value = getattr(self, name)
            if isinstance(value, list) and (not batch or len(value) != len(prompts)):
                raise ValueError(f"{name} is a list of {len(value)}: give one per prompt "
                                 f"({len(prompts)}), or one for all")
        if isinstance(self.rid, list) and len(set(self.rid)) != len(self.rid):
            raise ValueError("rid lists the same id twice")
        if isinstance(self.rid, str) and len(prompts) > 1:
            raise ValueError(f"rid {self.rid!r} is one id for a batch of {len(prompts)} "
                             "prompts: give a list of one per prompt")
        return self

    def prompts(self) -> tuple[list[Prompt], bool]:
        """The prompts, and whether they came as a batch."""
        if self.text is not None:
            return ([self.text], False) if isinstance(self.text, str) else (list(self.text), True)
        ids = self.input_ids
        if ids and isinstance(ids[0], list):
            return list(ids), True
        return [ids], False

    def params(self, i: int) -> SglSamplingParams:
        sp = self.sampling_params
        return sp[i] if isinstance(sp, list) else sp

    def request_id(self, i: int) -> str | None:
        return self.rid[i] if isinstance(self.rid, list) else self.rid


class AbortRequest(Strict):
    rid: str | None = None
    abort_all: bool = False

    @model_validator(mode="after")
    def _something(self):
        if self.rid is None and not self.abort_all:
            raise ValueError("give rid, or abort_all: true")
        return self


class PauseRequest(Strict):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class WeightsFromTensorRequest(Strict):
    serialized_named_tensors: list[str] = Field(
        min_length=1, max_length=1, description="base64 ForkingPickler dumps, one per rank "
                                                "(this engine is one rank)")
    load_format: Literal["flattened_bucket"] | None = None
    flush_cache: bool = Field(True, description="updates always drop the prefix cache")
    abort_all_requests: bool = False
    weight_version: str | None = None


class InitGroupRequest(Strict):
    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1, description="rank 0 is the trainer")
    world_size: int = Field(ge=2)
    group_name: str = Field("weight_update_group", min_length=1)
    backend: Literal["gloo", "nccl"] | None = None

    @model_validator(mode="after")
    def _rank_inside(self):
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset ({self.rank_offset}) must be < world_size "
                             f"({self.world_size})")
        return self


class WeightsFromDistributedRequest(Strict):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[Annotated[int, Field(ge=0)]]]
    group_name: str = "weight_update_group"
    flush_cache: bool = Field(True, description="updates always drop the prefix cache")
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: None = None

    @model_validator(mode="after")
    def _same_lengths(self):
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise ValueError(f"names ({len(self.names)}), dtypes ({len(self.dtypes)}) and shapes "
                             f"({len(self.shapes)}) must have the same length")
        return self


class DestroyGroupRequest(Strict):
    group_name: str = "weight_update_group"


class WeightsFromDiskRequest(Strict):
    model_path: str = Field(min_length=1)
    load_format: Literal["auto", "safetensors"] | None = None
    weight_version: str | None = None
    flush_cache: bool = Field(True, description="updates always drop the prefix cache")
    abort_all_requests: bool = False


class WeightVersionRequest(Strict):
    new_version: str = Field(min_length=1)
    abort_all_requests: bool = False


class MemoryRequest(Strict):
    tags: list[Literal[MEMORY_TAGS]] | None = Field(None, description="none: all")

    def engine_tags(self) -> list[str] | None:
        return None if self.tags is None else [t for t in self.tags if t != "cuda_graph"]
