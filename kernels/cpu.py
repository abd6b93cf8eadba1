"""Batch-invariant torch implementations of the forward's ops, for the CPU.

Every function here returns, for each row of its input, bits that depend only on that row,
never on how many rows came with it or where the row sat. How:

- Row reductions are matmuls with a column of ones, on the same fixed row tiles as `linear`;
  inside attention, `tree_sum` (pairwise halving built from elementwise adds) sums each split.
- Matmuls call BLAS only on shapes whose row results are independent of the row count: fixed
  row tiles for `linear` (the tile sizes that agree bitwise are measured once per weight shape),
  and, for attention, operands laid out so that every row count >= 2 takes one kernel path.
- Transcendentals are only `exp`, `log`, `rsqrt`, `cos`, `sin`, whose vectorized and scalar
  paths agree; `silu` is rebuilt from `exp` because torch's own does not.
"""

import weakref
from functools import partial

import torch
import torch.nn.functional as F

from kernels import composite

_LINEAR_TILE_CANDIDATES = (16, 32, 64, 128)
_tile_cache: dict[tuple, tuple[int, ...]] = {}
_split_cache: dict[tuple, bool] = {}


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in a fixed pairwise order: halving over the width padded
    with zeros to a power of two (the padding is never materialized: adding 0 is exact)."""
    n = x.shape[-1]
    if n == 1:
        return x[..., 0]
    half = 1 << (n - 1).bit_length() - 1
    y = x[..., :half].clone()
    y[..., :n - half] += x[..., half:]
    while half > 1:
        half //= 2
        y = y[..., :half] + y[..., half:]
    return y[..., 0]


_ones: dict[tuple, torch.Tensor] = {}


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension: one tiled matmul with a column of ones (BLAS's reduction
    order is fixed per tile class, like every other matmul here)."""
    n = x.shape[-1]
    key = (n, x.dtype, x.device)
    if key not in _ones:
        _ones[key] = torch.ones(n, 1, dtype=x.dtype, device=x.device)
    ones = _ones[key]
    rows = x.reshape(-1, n)
    return _tiled_mm(rows.contiguous(), ones, linear_tiles(ones)).reshape(x.shape[:-1])


def _tiled_mm(x: torch.Tensor, w_t: torch.Tensor, tiles: tuple[int, ...]) -> torch.Tensor:
    """x [M, K] @ w_t [K, N], as mm calls whose row counts are all taken from `tiles`: the
    largest tile that fits, repeatedly; a remainder below the smallest tile is zero-padded."""
    m = x.shape[0]
    out = torch.empty(m, w_t.shape[1], dtype=x.dtype, device=x.device)
    i = 0
    while m - i >= tiles[0]:
        tile = max(t for t in tiles if t <= m - i)
        torch.mm(x[i:i + tile], w_t, out=out[i:i + tile])
        i += tile
    if i < m:
        pad = torch.zeros(tiles[0], x.shape[1], dtype=x.dtype, device=x.device)
        pad[:m - i] = x[i:]
        out[i:] = torch.mm(pad, w_t)[:m - i]
    return out


def linear_tiles(w_t: torch.Tensor) -> tuple[int, ...]:
    """Row tile sizes whose mm results agree bitwise with the smallest tile, for x @ w_t.

    BLAS picks kernels by problem shape (and by operand strides); tiles in one class give each
    row the same bits. Measured on the real operand once per (shape, strides, dtype, threads).
    """
    key = (tuple(w_t.shape), w_t.stride(), w_t.dtype, torch.get_num_threads())
    tiles = _tile_cache.get(key)
    if tiles is None:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(_LINEAR_TILE_CANDIDATES[-1], w_t.shape[0], generator=gen)
        probe = probe.to(w_t.dtype)
        base_t = _LINEAR_TILE_CANDIDATES[0]
        ref = torch.mm(probe[:base_t], w_t)
        tiles = (base_t,)
        for t in _LINEAR_TILE_CANDIDATES[1:]:
            if not torch.equal(torch.mm(probe[:t], w_t)[:base_t], ref):
                break
            tiles += (t,)
        _tile_cache[key] = tiles
    return tiles


def matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w_t [K, N]; each output row depends only on its input row."""
    return _tiled_mm(x.contiguous(), w_t, linear_tiles(w_t))


def needs_splits(w: torch.Tensor, splits: tuple[int, ...]) -> bool:
    """Whether a fused weight must be computed part by part to give the parts' bits: BLAS
    results can depend on the column count. Measured once per (shape, splits, dtype, threads)."""
    key = (tuple(w.shape), splits, w.dtype, torch.get_num_threads())
    if key not in _split_cache:
        gen = torch.Generator().manual_seed(1)
        probe = torch.randn(_LINEAR_TILE_CANDIDATES[-1], w.shape[1], generator=gen).to(w.dtype)
        tiles = linear_tiles(w.t())
        fused = _tiled_mm(probe, w.t(), tiles)
        parts, start = [], 0
        for size in splits:
            parts.append(_tiled_mm(probe, w[start:start + size].t(),
                                   linear_tiles(w[start:start + size].t())))
            start += size
        _split_cache[key] = not torch.equal(fused, torch.cat(parts, dim=-1))
    return _split_cache[key]


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """F.linear, batch invariant. `splits` names the parts of a fused weight (q/k/v, gate/up):
    where BLAS would give a part different bits inside the fused product than alone, the parts
    are computed one by one, so the fused layer matches the separate projections bitwise."""
    x2 = x.reshape(-1, x.shape[-1])
    if splits is None or not needs_splits(w, splits):
        out = matmul(x2, w.t())
    else:
        parts, start = [], 0
        for size in splits:
            parts.append(matmul(x2, w[start:start + size].t()))
            start += size
        out = torch.cat(parts, dim=-1)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], w.shape[0])






# ---------------------------------------------------------------- attention
#
# Keys are split into blocks of a fixed size S at absolute positions 0, S, 2S, ... (one KV-cache
# block is one split) and folded into a running softmax in split order. The cache stores K
# transposed per block ([blocks, kv_heads, head_dim, S]) and V as [blocks, kv_heads, S, head_dim],
# so both bmm operands are contiguous tiles: with contiguous operands every row count >= 2 takes
# the same BLAS path, which makes a query's bits the same in decode, prefill and scoring.


def _fold_split(state, scores: torch.Tensor, q_pos: torch.Tensor, split: int, pv):
    """Fold one split into the running softmax of every row. scores [..., S] are scaled and
    unmasked; pv(p) returns p @ V for the split. A row that sees no key of the split is left
    exactly as it was."""
    m, l, acc = state
    size = scores.shape[-1]
    key_pos = torch.arange(split * size, (split + 1) * size, device=scores.device)
    scores = scores.masked_fill(key_pos > q_pos.unsqueeze(-1), float("-inf"))
    m_new = torch.maximum(m, scores.amax(-1))
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_safe)
    p = torch.exp(scores - m_safe.unsqueeze(-1))
    l = l * alpha + tree_sum(p)
    acc = acc * alpha.unsqueeze(-1) + pv(p)
    return m_new, l, acc


def _initial_state(rows_shape, d: int, device):
    return (torch.full(rows_shape, float("-inf"), device=device),
            torch.zeros(rows_shape, device=device),
            torch.zeros(*rows_shape, d, device=device))


def _attend(q_rows: torch.Tensor, q_pos: torch.Tensor, tiles, num_splits: int,
            scale: float) -> torch.Tensor:
    """q_rows [B, M, D] float32, q_pos [B, M]; tiles(s) -> (k_t [B, D, S], v [B, S, D])."""
    pad = q_rows.shape[1] == 1  # one row takes BLAS's gemv path; two rows take the gemm path
    if pad:
        q_rows = torch.cat([q_rows, torch.zeros_like(q_rows)], dim=1)
        q_pos = torch.cat([q_pos, q_pos], dim=1)
    state = _initial_state(q_rows.shape[:2], q_rows.shape[2], q_rows.device)
    for s in range(num_splits):
        k_t, v = tiles(s)
        scores = torch.bmm(q_rows, k_t.to(torch.float32)) * scale
        state = _fold_split(state, scores, q_pos, s,
                            lambda p: torch.bmm(p, v.to(torch.float32)))
    _, l, acc = state
    out = acc / l.unsqueeze(-1)
    return out[:, :1] if pad else out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, kv_heads, D] into one layer's cache at flat slots (block * S + offset)."""
    size = v_cache.shape[2]
    blocks, offsets = slot_mapping // size, slot_mapping % size
    k_cache[blocks, :, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets, :] = v.to(v_cache.dtype)


_last_plan: list = [(lambda: None, None)]  # [(weakref to the block tables, their plan)]


def _decode_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, size: int) -> list:
    """Per split: groups (blocks [U], seqs [U * c], c) of the sequences that read each block,
    c sequences per block. A block shared by c sequences (a GRPO group's prompt) is read once
    for all of them. Made once per step: every layer has the same block tables."""
    ref, plan = _last_plan[0]
    if ref() is not block_tables:
        tables, lens = block_tables.tolist(), context_lens.tolist()
        plan = []
        for s in range(-(-max(lens) // size)):
            readers: dict[int, list[int]] = {}
            for i, (table, n) in enumerate(zip(tables, lens)):
                if s * size < n:
                    readers.setdefault(table[s], []).append(i)
            by_count: dict[int, tuple[list[int], list[int]]] = {}
            for block, seqs in readers.items():
                blocks, rows = by_count.setdefault(len(seqs), ([], []))
                blocks.append(block)
                rows.extend(seqs)
            plan.append([(torch.tensor(b, device=block_tables.device),
                          torch.tensor(r, device=block_tables.device), c)
                         for c, (b, r) in sorted(by_count.items())])
        _last_plan[0] = (weakref.ref(block_tables), plan)
    return plan


def _grouped(x: torch.Tensor, seqs: torch.Tensor, c: int) -> torch.Tensor:
    """Rows of the sequences that share a block, stacked: [N, H, g, X] -> [U * H, c * g, X]."""
    u = seqs.numel() // c
    _, h, g, last = x.shape
    rows = x.index_select(0, seqs).reshape(u, c, h, g, last).transpose(1, 2)
    return rows.reshape(u * h, c * g, last)


def _ungrouped(y: torch.Tensor, c: int, h: int, g: int) -> torch.Tensor:
    """Inverse of `_grouped`: [U * H, c * g, X] -> [U * c, H, g, X]."""
    u = y.shape[0] // h
    return y.reshape(u, h, c, g, y.shape[-1]).transpose(1, 2).reshape(u * c, h, g, y.shape[-1])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One new query per sequence. q [N, H, D]; block_tables [N, max_blocks]; context_lens [N]
    counts the keys, the query's own included. Returns [N, H, D] in q's dtype.

    Each split reads every block once: the query rows of all sequences sharing the block are
    stacked into one matmul (any row count >= 2 takes the same BLAS path, so a row's bits do
    not depend on how many sequences share its block)."""
    n, h, d = q.shape
    kv_heads, size = v_cache.shape[1], v_cache.shape[2]
    group = h // kv_heads
    q4 = q.to(torch.float32).reshape(n, kv_heads, group, d)
    if group == 1:  # one row would take BLAS's gemv path: add a zero row
        q4 = torch.cat([q4, torch.zeros_like(q4)], dim=2)
    rows = q4.shape[2]
    q_pos = (context_lens - 1).view(n, 1, 1).expand(n, kv_heads, rows)
    state = _initial_state((n, kv_heads, rows), d, q.device)
    for s, groups in enumerate(_decode_plan(block_tables, context_lens, size)):
        scores = torch.full((n, kv_heads, rows, size), float("-inf"), device=q.device)
        for blocks, seqs, c in groups:
            k_t = k_cache.index_select(0, blocks).reshape(-1, d, size).to(torch.float32)
            part = torch.bmm(_grouped(q4, seqs, c), k_t) * scale
            scores[seqs] = _ungrouped(part, c, kv_heads, rows)

        def pv(p, groups=groups):
            out = torch.zeros(n, kv_heads, rows, d, device=q.device)
            for blocks, seqs, c in groups:
                v = v_cache.index_select(0, blocks).reshape(-1, size, d).to(torch.float32)
                out[seqs] = _ungrouped(torch.bmm(_grouped(p, seqs, c), v), c, kv_heads, rows)
            return out

        state = _fold_split(state, scores, q_pos, s, pv)
    _, l, acc = state
    out = (acc / l.unsqueeze(-1))[:, :, :group]
    return out.reshape(n, h, d).to(q.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, positions: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """A run of consecutive queries of one sequence (a prefill chunk). q [L, H, D]; positions [L];
    block_table [num_blocks] covers every key up to the last position. Returns [L, H, D]."""
    length, h, d = q.shape
    kv_heads, size = v_cache.shape[1], v_cache.shape[2]
    num_splits = int(positions[-1].item()) // size + 1

    def tiles(s):
        blk = block_table[s]
        return k_cache[blk], v_cache[blk]

    return _dense_rows_attend(q, positions, kv_heads, tiles, num_splits, scale)


def _dense_rows_attend(q, positions, kv_heads, tiles, num_splits, scale):
    length, h, d = q.shape
    group = h // kv_heads
    q_rows = (q.to(torch.float32).reshape(length, kv_heads, group, d)
              .permute(1, 0, 2, 3).reshape(kv_heads, length * group, d))
    q_pos = positions.repeat_interleave(group).unsqueeze(0).expand(kv_heads, -1).contiguous()
    out = _attend(q_rows, q_pos, tiles, num_splits, scale)
    return (out.reshape(kv_heads, length, group, d).permute(1, 0, 2, 3)
            .reshape(length, h, d).to(q.dtype))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     split_size: int) -> torch.Tensor:
    """Causal self-attention of one contiguous sequence, bitwise what the paged kernels give.
    q [L, H, D], k/v [L, kv_heads, D]. For trainers scoring whole sequences."""
    length, kv_heads, d = k.shape
    num_splits = (length + split_size - 1) // split_size
    padded = num_splits * split_size
    k = F.pad(k, (0, 0, 0, 0, 0, padded - length)).reshape(num_splits, split_size, kv_heads, d)
    v = F.pad(v, (0, 0, 0, 0, 0, padded - length)).reshape(num_splits, split_size, kv_heads, d)
    k_tiles = k.permute(0, 2, 3, 1).contiguous()  # [splits, kv_heads, D, S]
    v_tiles = v.permute(0, 2, 1, 3).contiguous()  # [splits, kv_heads, S, D]
    positions = torch.arange(length, device=q.device)
    return _dense_rows_attend(q, positions, kv_heads, lambda s: (k_tiles[s], v_tiles[s]),
                              num_splits, scale)


# ---------------------------------------------------------------- composite ops on row_sum
mean_last = partial(composite.mean_last, row_sum)
rms_norm = partial(composite.rms_norm, row_sum)
softmax_parts = partial(composite.softmax_parts, row_sum)
log_softmax = partial(composite.log_softmax, row_sum)
silu, silu_and_mul = composite.silu, composite.silu_and_mul
