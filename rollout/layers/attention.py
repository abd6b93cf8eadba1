import torch
from torch import nn

from kernels import Ops
from rollout.context import get_context


class PagedAttention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends through it: cached and new
    tokens are read through one layout, the same way in prefill, chunked prefill and decode."""

    def __init__(self, ops: Ops, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        out = torch.empty_like(q)
        with ctx.timer.span("attention, prefill chunks"):
            self.ops.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
            for seg in ctx.prefills:
                rows = slice(seg.start, seg.end)
                out[rows] = self.ops.prefill_attention(q[rows], self.k_cache, self.v_cache,
                                                       seg.block_table, seg.positions,
                                                       self.scale)
        if ctx.decode_block_tables is not None:
            with ctx.timer.span("attention, decode rows"):
                rows = slice(ctx.decode_start, q.shape[0])
                out[rows] = self.ops.decode_attention(q[rows], self.k_cache, self.v_cache,
                                                      ctx.decode_block_tables,
                                                      ctx.decode_context_lens, self.scale)
        return out
