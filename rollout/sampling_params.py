import numbers
from dataclasses import dataclass, field, fields

MAX_TOP_LOGPROBS = 20
# below it, logits / temperature can overflow float32 (inf - inf: NaN log-probs)
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt. Shaped like vLLM's SamplingParams.

    temperature 0 is greedy. Reported log-probs are those of log_softmax(logits / temperature)
    over the full vocabulary (temperature 0 counts as 1), before top-k/top-p/min-p truncation:
    what a trainer recomputes.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    logprobs: bool = True
    top_logprobs: int = 0

    def __post_init__(self):
        self._check_types()
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        object.__setattr__(self, "stop", list(self.stop or []))
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids or []))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf"),
             "temperature", f"must be 0 (greedy) or finite and >= {MIN_TEMPERATURE}"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 or -1 disables it)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be <= max_tokens ({self.max_tokens})"),
            (self.n >= 1, "n", "must be >= 1"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
             f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            (all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0
                 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative token ids"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop_token_ids", [int(t) for t in self.stop_token_ids])

    def _check_types(self) -> None:
        """Numbers of the right kind (numpy's included), as Python's: 2.5 samples or a float
        seed would otherwise pass the range checks and fail inside a step."""
        kinds = {"temperature": numbers.Real, "top_p": numbers.Real, "min_p": numbers.Real,
                 "top_k": numbers.Integral, "max_tokens": numbers.Integral,
                 "min_tokens": numbers.Integral, "n": numbers.Integral,
                 "seed": numbers.Integral, "top_logprobs": numbers.Integral}
        for name, kind in kinds.items():
            value = getattr(self, name)
            if value is None and name in ("max_tokens", "seed"):
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                what = "an integer" if kind is numbers.Integral else "a number"
                raise ValueError(f"SamplingParams.{name} must be {what}, got {value!r} "
                                 f"({type(value).__name__})")
            object.__setattr__(self, name, int(value) if kind is numbers.Integral
                               else float(value))
        for name, value in (("stop", self.stop), ("stop_token_ids", self.stop_token_ids)):
            if not (value is None or isinstance(value, (list, tuple))
                    or (name == "stop" and isinstance(value, str))):
                raise ValueError(f"SamplingParams.{name} must be a list, got {value!r}")
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                hint = (" (top_logprobs=k asks for the k most likely tokens)"
                        if name == "logprobs" else "")
                raise ValueError(f"SamplingParams.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}{hint}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """From a JSON-like dict (HTTP APIs); unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d)
