from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sampled completion. `logprobs[i]` is the log-probability of `token_ids[i]` (None when
    the request set logprobs=False).

    `weight_version` produced the latest token; `weight_versions` lists every version whose
    weights computed this completion's K/V or tokens, in order: more than one means the weights
    were updated while it ran (it was not paused with "abort" or "retract")."""
    index: int
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None
    cached_tokens: int
    seed: int
    weight_version: int | str | None
    weight_versions: list[int | str] = field(default_factory=list)
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
