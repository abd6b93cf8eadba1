from enum import Enum, auto

from rollout.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One completion being generated: its tokens, KV blocks and progress.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the step that computes the
    last token samples the next one.
    """

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int, block_size: int):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.params = params
        self.seed = seed
        self.block_size = block_size
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.weight_versions: list[int | str] = []  # in order; more than one means mixed weights
        # stop strings only: the text of the output's first text_offsets[1] tokens (a
        # character still incomplete waits), decoded a few tokens at a time (offsets as
        # vLLM's incremental detokenizer keeps them); after a stop string, the text cut there
        self.text = ""
        self.text_offsets = (0, 0)
        self.stops_searched = False
        # siblings (other samples of the same prompt) that fork from this one after its prefill
        self.forks: list["Sequence"] = []
        # scoring only: price tokens from this position on, teacher-forced, and sample nothing
        self.score_from: int | None = None
        # False once its K/V mixes weight versions: its blocks must never enter the prefix cache
        self.cacheable = True

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + self.block_size - 1) // self.block_size

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_matchable_tokens(self) -> int:
        """Tokens a prefix-cache hit may cover: logits are needed after them."""
        return self.num_tokens - 1 if self.score_from is None else self.score_from - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def weight_version(self) -> int | str | None:
        """The version that produced the latest token."""
        return self.weight_versions[-1] if self.weight_versions else None

    def note_weight_version(self, version: int | str) -> None:
        if not self.weight_versions or self.weight_versions[-1] != version:
            self.weight_versions.append(version)

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append(self, token_id: int, logprob: float, top: dict[int, float] | None) -> None:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
