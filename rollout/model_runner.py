"""Owns the device state (weights, KV cache) and turns a scheduled batch into logits.

All tensors of a step are built here, in `prepare`."""

import time
import weakref

import torch

from kernels import forget_packed_weights, get_ops
from rollout.config import EngineConfig, ModelConfig
from rollout.context import ForwardContext, PrefillSegment, forward_context
from rollout.loader import build_model
from rollout.memory import Arena, keep_freed_host_memory, make_arena, trim_host_memory
from rollout.phases import PhaseTimer
from rollout.sampler import Sampler, SampleSpec
from rollout.scheduler import Sample, ScheduledBatch
from rollout.sequence import Sequence
from rollout.weights import WeightStore

_CPU_KV_CACHE_DEFAULT = 4 << 30


def _available_host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype(model_config.checkpoint_dtype)
        self.block_size = config.block_size
        if self.device.type == "cpu":
            keep_freed_host_memory()
        self.ops = get_ops(self.device, config.deterministic, config.kernel_backend,
                           config.packed_weights)
        self.model = build_model(model_config, self.ops, self.device, self.dtype, max_model_len)
        params = list(self.model.parameters())
        shapes = [p.shape for p in params]
        offsets = _aligned_offsets(shapes, self.dtype)
        self.weights_arena: Arena = make_arena(
            "weights", offsets[-1], self.dtype, self.device,
            lambda buf: _bind_parameters(params, shapes, offsets, buf))
        trim_host_memory()  # the parameters' first, separate allocations are gone
        self.weights = WeightStore(self.model.weight_targets(),
                                   model_config.tie_word_embeddings)
        self.weights.load_checkpoint(config.model)
        start = time.perf_counter()
        self.kernel_verdicts = tuple(self.model.prepare_kernels(self.block_size, self.dtype))
        self.kernel_prepare_seconds = time.perf_counter() - start
        self.sampler = Sampler(self.ops.softmax_parts)
        # the packed weight copies (CPU) outlive no engine: dropped when this runner goes
        weakref.finalize(self, forget_packed_weights)
        self.timer = PhaseTimer(self.device)
        self.num_blocks = self._num_blocks(max_model_len)
        self.k_cache = self.v_cache = None
        cfg = model_config
        self._kv_shape = (cfg.num_layers, self.num_blocks, cfg.num_kv_heads)
        half = cfg.num_layers * self.num_blocks * cfg.num_kv_heads * cfg.head_dim * self.block_size
        self.kv_arena: Arena = make_arena("kv_cache", 2 * half, self.dtype, self.device,
                                          self._bind_kv_cache, zero=True)

    @property
    def block_bytes(self) -> int:
        cfg = self.model_config
        return (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.block_size
                * self.dtype.itemsize)

    def _num_blocks(self, max_model_len: int) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:
                budget = min(_CPU_KV_CACHE_DEFAULT, int(_available_host_memory() * 0.3))
        enough = -(-max_model_len // self.block_size) * self.config.max_num_seqs
        blocks = min(budget // self.block_bytes, enough)
        if blocks < 1:
            raise ValueError(f"kv_cache_memory ({budget} bytes) holds no KV block "
                             f"({self.block_bytes} bytes each)")
        return blocks

    def _bind_kv_cache(self, buffer: torch.Tensor) -> None:
        """K is stored transposed per block: [layers, blocks, kv_heads, head_dim, block_size]."""
        if buffer.numel() == 0:
            self.k_cache = self.v_cache = None
            for layer in self.model.layers:
                layer.self_attn.attn.k_cache = layer.self_attn.attn.v_cache = buffer
            return
        d, s = self.model_config.head_dim, self.block_size
        half = buffer.numel() // 2
        self.k_cache = buffer[:half].view(*self._kv_shape, d, s)
        self.v_cache = buffer[half:].view(*self._kv_shape, s, d)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attn.k_cache = self.k_cache[i]
            layer.self_attn.attn.v_cache = self.v_cache[i]

    def other_bytes(self) -> int:
        """Device memory held besides weights and KV cache (rotary tables)."""
        return sum(b.numel() * b.element_size() for b in self.model.buffers())

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (every layer) from src to dst, for forks: one strided copy per
        block (on the CPU, 6x faster than one gather of them all through advanced indexing)."""
        for src, dst in pairs:
            self.k_cache[:, dst].copy_(self.k_cache[:, src])
            self.v_cache[:, dst].copy_(self.v_cache[:, src])

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        s = self.block_size
        return [seq.block_table[p // s] * s + p % s for p in range(start, end)]

    def prepare(self, batch: ScheduledBatch):
        """Flat token rows (prefill chunks first, then decodes) and their attention metadata."""
        device = self.device
        ids, positions, slots, prefills = [], [], [], []
        for seq, n in batch.prefills:
            start, first = len(ids), seq.num_computed_tokens
            ids += seq.token_ids[first:first + n]
            positions += range(first, first + n)
            slots += self._slots(seq, first, first + n)
            blocks = -(-(first + n) // self.block_size)
            prefills.append(PrefillSegment(
                start, start + n, torch.tensor(seq.block_table[:blocks], device=device),
                torch.arange(first, first + n, device=device)))
        ctx = ForwardContext(slot_mapping=torch.empty(0), prefills=prefills, decode_start=len(ids),
                             timer=self.timer)
        if batch.decodes:
            width = max(len(seq.block_table) for seq in batch.decodes)
            tables = [seq.block_table + [0] * (width - len(seq.block_table))
                      for seq in batch.decodes]
            for seq in batch.decodes:
                ids.append(seq.token_ids[-1])
                positions.append(seq.num_tokens - 1)
                slots += self._slots(seq, seq.num_tokens - 1, seq.num_tokens)
            ctx.decode_block_tables = torch.tensor(tables, device=device)
            ctx.decode_context_lens = torch.tensor([s.num_tokens for s in batch.decodes],
                                                   device=device)
        ctx.slot_mapping = torch.tensor(slots, device=device)
        return (torch.tensor(ids, device=device), torch.tensor(positions, device=device), ctx)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, eos_token_ids: tuple[int, ...]
            ) -> tuple[dict[int, Sample], dict[int, list[float]]]:
        """One step: forward the batch, sample every generating sequence whose last token was
        computed, and price the response tokens of scoring sequences computed this step."""
        timer = self.timer
        with timer.span("prepare"):
            rows, specs, scoring = _logit_rows(batch, eos_token_ids)
            input_ids, positions, ctx = self.prepare(batch)
        with timer.span("prefill forward" if batch.prefills else "decode forward"):
            with forward_context(ctx):
                hidden = self.model(input_ids, positions)
            if not rows:
                return {}, {}
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        with timer.span("sampling"):
            scores = {seq.seq_id: self.sampler.score(logits[at:at + len(targets)], targets,
                                                     seq.params.temperature)
                      for seq, at, targets in scoring}
            return self.sampler(logits, specs), scores


def _logit_rows(batch: ScheduledBatch, eos_token_ids: tuple[int, ...]):
    """Which rows of the flat batch need logits: the last computed token of every generating
    sequence (with a sample spec for it and its forks), and the response tokens of scoring
    sequences computed this step (with their targets)."""
    rows, specs, scoring = [], [], []
    start = 0
    for seq, n in [*batch.prefills, *((s, 1) for s in batch.decodes)]:
        first = seq.num_computed_tokens
        if seq.score_from is not None:
            lo, hi = max(first, seq.score_from - 1), min(first + n, seq.num_tokens - 1)
            if hi > lo:
                scoring.append((seq, len(rows), seq.token_ids[lo + 1:hi + 1]))
                rows += range(start + lo - first, start + hi - first)
        elif first + n == seq.num_tokens:
            rows.append(start + n - 1)
            specs += [_spec(len(rows) - 1, t, eos_token_ids) for t in (seq, *seq.forks)]
        start += n
    return rows, specs, scoring


def _spec(row: int, seq: Sequence, eos_token_ids: tuple[int, ...]) -> SampleSpec:
    p = seq.params
    suppress = ()
    if seq.num_output_tokens < p.min_tokens:
        suppress = tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos
                                                          else set(eos_token_ids))))
    return SampleSpec(row=row, seq_id=seq.seq_id, temperature=p.temperature, top_k=p.top_k,
                      top_p=p.top_p, min_p=p.min_p, seed=seq.seed,
                      position=seq.num_output_tokens, suppress=suppress,
                      top_logprobs=p.top_logprobs)


_ALIGN_BYTES = 64


def _aligned_offsets(shapes: list[torch.Size], dtype: torch.dtype) -> list[int]:
    """Element offsets of each parameter in the flat weights buffer, each on a 64-byte boundary
    (as a trainer's separately allocated tensors are: BLAS may pick kernels by alignment), and
    the buffer's size last."""
    step = _ALIGN_BYTES // dtype.itemsize
    offsets, at = [], 0
    for shape in shapes:
        offsets.append(at)
        at += -(-shape.numel() // step) * step
    return offsets + [at]


def _bind_parameters(params: list[torch.nn.Parameter], shapes: list[torch.Size],
                     offsets: list[int], buffer: torch.Tensor) -> None:
    """Make every parameter a view of `buffer` (the same Parameter objects, new storage); an
    empty buffer leaves them empty (released)."""
    forget_packed_weights()  # copies of the old storage
    for p, shape, offset in zip(params, shapes, offsets):
        p.data = buffer if buffer.numel() == 0 else buffer[offset:offset + shape.numel()].view(shape)
