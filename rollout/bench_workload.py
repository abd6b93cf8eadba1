"""The work `rollout bench` gives every system: a seeded, GRPO-shaped batch of requests, and the
result every system reports for it."""

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rollout.sampling_params import SamplingParams

# Warms every system up before it is timed; shorter than a KV block, so never a cached prefix.
WARM_UP_PROMPT = list(range(1, 9))


@dataclass(frozen=True)
class Workload:
    """`num_prompts` prompts of lengths spread over [min_prompt_len, max_prompt_len], `n` samples
    each. All samples of request i run to exactly `response_lengths()[i]` tokens (EOS ignored),
    the lengths spread over [max_tokens / 4, max_tokens], as a GRPO group's responses end at
    different points. Everything is drawn from `seed`: every run is the same work."""
    num_prompts: int = 16
    n: int = 4
    min_prompt_len: int = 64
    max_prompt_len: int = 256
    max_tokens: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("num_prompts", "n", "min_prompt_len", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_prompt_len < self.min_prompt_len:
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) must be at least "
                             f"min_prompt_len ({self.min_prompt_len})")

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1000 + stream) % (1 << 63))

    def prompt_lengths(self) -> list[int]:
        return torch.randint(self.min_prompt_len, self.max_prompt_len + 1, (self.num_prompts,),
                             generator=self._generator(1)).tolist()

    def response_lengths(self) -> list[int]:
        low = max(1, -(-self.max_tokens // 4))
        return torch.randint(low, self.max_tokens + 1, (self.num_prompts,),
                             generator=self._generator(2)).tolist()

    def prompts(self, vocab_size: int) -> list[list[int]]:
        g = self._generator(3)
        return [torch.randint(0, vocab_size, (n,), generator=g).tolist()
                for n in self.prompt_lengths()]

    def params(self) -> list[SamplingParams]:
        """One request per prompt: temperature 1 over the full vocabulary, n samples, each
        seeded."""
        return [SamplingParams(temperature=1.0, n=self.n, max_tokens=length, ignore_eos=True,
                               seed=self.seed + i * self.n)
                for i, length in enumerate(self.response_lengths())]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the workload, each prompt counted once (a group shares it)."""
        return sum(self.prompt_lengths())

    @property
    def output_tokens(self) -> int:
        return self.n * sum(self.response_lengths())

    def describe(self) -> str:
        return (f"{self.num_prompts} prompts x n={self.n}, prompts of "
                f"{self.min_prompt_len}-{self.max_prompt_len} tokens ({self.prompt_tokens} in "
                f"all), responses of {min(self.response_lengths())}-{max(self.response_lengths())}"
                f" tokens ({self.output_tokens} in all), seed {self.seed}")


@dataclass
class RunResult:
    """One system's run of a workload. `output_tokens` counts only the tokens the requests asked
    for (a baseline that runs past them, as padded batches do, gets no credit for the rest)."""
    system: str
    seconds: float
    prompt_tokens: int
    output_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    def to_json(self) -> dict:
        return {"system": self.system, "seconds": self.seconds,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "output_tokens_per_s": self.output_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s, **self.extra}


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class BenchOptions:
    """What `rollout bench` compares against and how: baselines run on the same workload.
    A suite shows lines through `emit` as soon as they are measured, and returns the rest."""
    baselines: tuple[str, ...] = ()
    hf_prompts_per_call: int = 4
    progress: bool = True
    vllm_python: str | None = None  # an interpreter with vllm installed; None: this one
    repeat: int = 1  # rounds of every system (engine modes, baselines); each keeps its fastest
    emit: Callable[[str], None] = _print

    def __post_init__(self):
        if self.repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {self.repeat}")
        if self.hf_prompts_per_call < 1:
            raise ValueError(f"hf_prompts_per_call must be >= 1, got {self.hf_prompts_per_call}")
        python = self.vllm_python
        if python is not None and not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ValueError(f"vllm_python {python!r} is not an executable file")


@dataclass
class SuiteResult:
    lines: list[str]  # those not emitted yet
    data: dict = field(default_factory=dict)
