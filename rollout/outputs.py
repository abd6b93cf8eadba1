from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sampled completion. `logprobs[i]` is the log-probability of `token_ids[i]`."""
    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    cached_tokens: int
    seed: int
    weight_version: int | None
    text: str | None = None
    top_logprobs: list[dict[int, float]] | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
