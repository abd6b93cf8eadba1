"""Continuous batching: which sequences run this step, with how many tokens each.

Running sequences go first (decodes and unfinished prefills, in arrival order), then waiting ones,
all within one token budget per step. Prefill chunks end on block boundaries, so chunking never
splits an attention split. When the KV cache runs out, the most recently admitted sequence is
preempted and later recomputed (its tokens are kept; recomputation gives the same bits).
"""

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rollout.block_manager import BlockManager
from rollout.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, new tokens)
    decodes: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)

    @property
    def sampling(self) -> list[Sequence]:
        """Generating sequences whose last token is computed this step (valid until
        postprocess)."""
        done = [s for s, n in self.prefills if s.num_computed_tokens + n == s.num_tokens]
        return [s for s in done + self.decodes if s.score_from is None]

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


@dataclass
class Sample:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None = None


@dataclass
class SchedulerStats:
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    steps: int = 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...],
                 detokenize: Callable[[list[int]], str] | None = None):
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.detokenize = detokenize
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_uncomputed_tokens
        if remaining <= budget:
            return remaining
        end = (seq.num_computed_tokens + budget) // self.block_size * self.block_size
        return max(0, end - seq.num_computed_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        if seq.score_from is not None:  # recomputed from its first scored token: scored again
            seq.logprobs = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def forget_cached_prefixes(self) -> None:
        """After a weight update: drop every cached prefix, and keep the blocks of sequences
        still running on K/V from the old weights out of the cache for good."""
        self.block_manager.reset_prefix_cache()
        for seq in self.running:
            seq.cacheable = False

    def retract_all(self) -> None:
        """Put every running sequence back in the queue, its KV cache freed (recomputed later,
        with the same bits)."""
        for seq in reversed(list(self.running)):
            self._preempt(seq)

    def _place(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        if n == 1 and seq.num_uncomputed_tokens == 1:
            batch.decodes.append(seq)
        else:
            batch.prefills.append((seq, n))

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            n = self._chunk(seq, budget)
            if n == 0:
                continue
            while not self.block_manager.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self._place(batch, seq, n)
                budget -= n
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            fresh = not seq.block_table
            if fresh:
                seq.num_computed_tokens = self.block_manager.match_prefix(seq)
            n = self._chunk(seq, budget)
            if n == 0 or not self.block_manager.allocate(seq, n):
                if fresh:
                    self.block_manager.free_sequence(seq)
                break
            if seq.num_output_tokens == 0 and not seq.num_cached_tokens:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._place(batch, seq, n)
            budget -= n
        return batch

    def postprocess(self, batch: ScheduledBatch, samples: dict[int, Sample],
                    scores: dict[int, list[float]], weight_version: int | str | None
                    ) -> tuple[list[Sequence], list[tuple[int, int]]]:
        """Advance the batch's sequences, append their samples (keyed by seq_id, forks
        included) and scores. Returns the sequences that finished and the KV blocks to copy
        for forks."""
        sampling = batch.sampling
        self.stats.steps += 1
        self.stats.decode_tokens += len(batch.decodes)
        for seq, n in batch.prefills:
            self.stats.prefill_tokens += n
        finished, copies = [], []
        for seq, n in [*batch.prefills, *((s, 1) for s in batch.decodes)]:
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            # every chunk's K/V counts: a prompt prefilled across an update mixes versions
            seq.note_weight_version(weight_version)
            if seq.score_from is not None:
                seq.logprobs += scores.get(seq.seq_id, [])
                if seq.num_computed_tokens == seq.num_tokens:
                    self.finish(seq, "score")
                    finished.append(seq)
        for seq in sampling:
            forks, seq.forks = seq.forks, []
            for child in forks:
                copies.extend(self._fork(seq, child))
                self._append(child, samples[child.seq_id], weight_version, finished)
            self._append(seq, samples[seq.seq_id], weight_version, finished)
        return finished, copies

    def _fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        partial = parent.num_computed_tokens % self.block_size != 0
        if (len(self.running) >= self.max_num_seqs
                or (partial and self.block_manager.num_free_blocks == 0)):
            child.status = SequenceStatus.WAITING  # recomputed later, sharing full blocks
            self.waiting.appendleft(child)
            return []
        copy = self.block_manager.fork(parent, child)
        # the parent's K/V, of the parent's weight versions (kept out of the cache with it)
        child.cacheable = parent.cacheable
        child.weight_versions = list(parent.weight_versions)
        child.num_cached_tokens = child.num_prompt_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)
        return [copy] if copy else []

    def _append(self, seq: Sequence, sample: Sample, weight_version: int | str | None,
                finished: list[Sequence]) -> None:
        seq.append(sample.token_id, sample.logprob, sample.top_logprobs)
        seq.note_weight_version(weight_version)
        reason = self._stop_reason(seq)
        if reason is not None:
            self.finish(seq, reason)
            finished.append(seq)

    def _stop_reason(self, seq: Sequence) -> str | None:
        params, token = seq.params, seq.token_ids[-1]
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if params.stop and self._stop_string(seq):
            return "stop"
        return "length" if self._last(seq) else None

    def _stop_string(self, seq: Sequence) -> bool:
        """Whether a stop string ends in the text that changed with the last token (the text
        is cut there). As vLLM's: one counts once it ends past the text of the first
        min_tokens tokens."""
        params = seq.params
        changed = self._extend_text(seq)
        if seq.num_output_tokens <= params.min_tokens:
            return False
        if not seq.stops_searched:  # the first search: all the text past min_tokens' text
            seq.stops_searched = True
            changed = (len(self.detokenize(seq.output_token_ids[:params.min_tokens]))
                       if params.min_tokens else 0)
        for stop in params.stop:
            cut = seq.text.find(stop, max(0, changed - len(stop) + 1))
            if cut != -1:
                seq.text, seq.stop_reason = seq.text[:cut], stop
                return True
        return False

    def _extend_text(self, seq: Sequence) -> int:
        """Bring seq.text to the text of the output tokens; returns where it changed. The new
        tokens are decoded with a few before them (vLLM's offsets), so a step's cost does not
        grow with the output. A character still incomplete (U+FFFD at the end) waits, for a
        few tokens and not past the last one; where U+FFFD is in play (malformed bytes, or a
        character completed after it was shown incomplete) the whole output is decoded, as
        the final text is, and the search restarts where it first differs."""
        prefix, read = seq.text_offsets
        start, count = seq.num_prompt_tokens, seq.num_output_tokens
        before = self.detokenize(seq.token_ids[start + prefix:start + read])
        after = self.detokenize(seq.token_ids[start + prefix:])
        if "\ufffd" in after or seq.text.endswith("\ufffd"):
            if after.endswith("\ufffd") and count - read < 4 and not self._last(seq):
                return len(seq.text)
            old, seq.text = seq.text, self.detokenize(seq.output_token_ids)
            seq.text_offsets = (read, count)
            return len(os.path.commonprefix([old, seq.text]))
        changed = len(seq.text)
        if len(after) > len(before):  # else tokens of no text (special ones, skipped)
            seq.text += after[len(before):]
            seq.text_offsets = (read, count)
        return changed

    def _last(self, seq: Sequence) -> bool:
        max_tokens = seq.params.max_tokens
        return ((max_tokens is not None and seq.num_output_tokens >= max_tokens)
                or seq.num_tokens >= self.max_model_len)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` now (stop, length or abort) and give back its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
