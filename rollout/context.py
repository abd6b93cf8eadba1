"""Attention metadata for one forward pass, set by the runner and read by attention layers,
so that model `forward(input_ids, positions)` stays free of bookkeeping."""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from rollout.phases import NO_TIMER, PhaseTimer


@dataclass
class PrefillSegment:
    """Consecutive tokens of one sequence: rows [start, end) of the flat batch."""
    start: int
    end: int
    block_table: torch.Tensor
    positions: torch.Tensor


@dataclass
class ForwardContext:
    slot_mapping: torch.Tensor
    prefills: list[PrefillSegment] = field(default_factory=list)
    decode_start: int = 0
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    timer: PhaseTimer = NO_TIMER


_current: list[ForwardContext] = []


@contextmanager
def forward_context(ctx: ForwardContext):
    if _current:
        raise RuntimeError("forward contexts do not nest: a forward pass is already running")
    _current.append(ctx)
    try:
        yield ctx
    finally:
        _current.pop()


def get_context() -> ForwardContext:
    if not _current:
        raise RuntimeError("attention ran outside a forward context; call the model through "
                           "ModelRunner")
    return _current[0]
