"""Batch-invariant torch implementations of the forward's ops, for the CPU.

Every function here returns, for each row of its input, bits that depend only on that row,
never on how many rows came with it or where the row sat. How:

- Matmuls call BLAS only with a fixed row tile (rows padded with zeros up to it), and only with
  tiles proven invariant on this machine for the exact operand shape, strides, dtype and thread
  count (`kernels.invariance`); where none is, they run `owned_mm`, whose order is ours.
- Row reductions are matmuls with a column of ones, on the same proven tiles; inside attention,
  `tree_sum` (pairwise halving built from elementwise adds) sums each split.
- Attention score and value products are batched matmuls on proven row tiles too, batch counts
  capped at `invariance.MAX_BATCH`.
- Transcendentals are only `exp`, `log`, `rsqrt`, `cos`, `sin`, whose vectorized and scalar
  paths agree; `silu` is rebuilt from `exp` because torch's own does not.
- Where the machine has a C compiler, attention, row sums, RMSNorm, the rotary embedding and the
  KV-cache store run `kernels/native.c` instead (see `native`): one fixed order per row.
"""

import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from kernels import composite, invariance, native
from kernels.composite import tree_sum
from kernels.invariance import Plan

_plans: dict[tuple, tuple[Plan, invariance.Verdict]] = {}


# float32 linears on the CPU go through oneDNN's linear: faster than torch's MKL sgemm here at
# every row count (most at decode's few rows); torch's bfloat16 matmul is oneDNN already. Each
# oneDNN call pays ~15 us of set-up, so narrow products (row sums) stay on torch.mm.
DNN_MIN_COLUMNS = 64


def _dnn(a: torch.Tensor, w_t: torch.Tensor) -> bool:
    return (a.device.type == "cpu" and a.dtype == torch.float32
            and w_t.shape[1] >= DNN_MIN_COLUMNS and torch.backends.mkldnn.is_available())


def blas_mm(a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """The one BLAS matmul call of this backend: a [T, K] @ w_t [K, N], T a proven tile."""
    if _dnn(a, w_t):
        return torch.ops.mkldnn._linear_pointwise(a, w_t.t(), None, "none", [], "")
    return torch.mm(a, w_t)


def blas_bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The one batched BLAS call: a [B, T, K] @ b [B, K, N], contiguous, T a proven tile (into
    `out` [B, T, N], contiguous, where given: torch's same kernel, writing there)."""
    return torch.bmm(a, b, out=out)


# The engine's own weights: oneDNN's linear on a copy of the weight reordered once into its
# blocked layout ("packed") skips the per-call reorder (15-40% faster at decode's few rows).
# Used only where the proof saw it give the plain call's bits on every tile (a trainer calls
# the plain one); copies are dropped whenever the weights are written or rebound.
_packed: dict[tuple, torch.Tensor] = {}


def _packable(w_t: torch.Tensor) -> bool:
    return (w_t.device.type == "cpu" and w_t.dtype in (torch.float32, torch.bfloat16)
            and w_t.shape[1] >= DNN_MIN_COLUMNS and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _pack(w_t: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w_t.t(), None)


def pack_weight(w_t: torch.Tensor) -> torch.Tensor | None:
    """w_t [K, N] packed once for `packed_mm`, or None where oneDNN does not take it."""
    return _pack(w_t) if _packable(w_t) else None


def packed_mm(a: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """a [T, K] @ the packed weight: the packed twin of `blas_mm`."""
    return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")


def _packed_weight(w_t: torch.Tensor, pack=None) -> torch.Tensor:
    """w_t's packed copy (oneDNN's, or `pack`'s), made on first use."""
    pack = pack or _pack
    key = (w_t.data_ptr(), tuple(w_t.shape), w_t.stride(), w_t.dtype, pack.__name__)
    if key not in _packed:
        _packed[key] = pack(w_t)
    return _packed[key]


def forget_packed() -> None:
    """Drop every packed weight copy (the engine calls this when its weights change)."""
    _packed.clear()


def _packed_twin(w_t: torch.Tensor):
    """The packed call for the proof of w_t's shape (the probe operand packed once)."""
    if not _packable(w_t):
        return None
    packs: dict[int, torch.Tensor] = {}

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if b.data_ptr() not in packs:
            packs.clear()
            packs[b.data_ptr()] = _pack(b)
        return packed_mm(a[0], packs[b.data_ptr()]).unsqueeze(0)
    return product


def owned_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] in an order of our own: float32 products added in order of
    k, each step a separate elementwise multiply and add (exactly rounded, so no vector or scalar
    path of any kernel changes a bit). Slow; for shapes where no BLAS tile proves invariant."""
    acc = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=torch.float32, device=a.device)
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    for k in range(a.shape[-1]):
        acc = acc + a32[..., k:k + 1] * b32[..., k:k + 1, :]
    return acc.to(a.dtype)


def reset() -> None:
    """Forget every plan and verdict (for tests that swap the BLAS calls)."""
    _plans.clear()
    _amx_tiles.clear()
    _ones.clear()
    _packed.clear()
    invariance.reset()


def _shape_label(k: int, n: int) -> str:
    return f"K={k} N={n}"


def _decided(key: tuple, prove, op: str, shape: str, dtype) -> tuple[Plan, invariance.Verdict]:
    got = _plans.get(key)
    if got is None:
        plan = prove()
        plan.cover_all()
        got = _plans[key] = (plan, invariance.record(op, shape, dtype, plan.describe(), True))
    return got


def _mm_one(a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    return blas_mm(a[0], w_t).unsqueeze(0)


def _mm_decided(w_t: torch.Tensor, op: str) -> tuple[Plan, invariance.Verdict]:
    key = (tuple(w_t.shape), w_t.stride(), w_t.dtype, w_t.data_ptr() % 64,
           torch.get_num_threads())
    return _decided(key, lambda: invariance.prove_tiles(_mm_one, w_t, twin=_packed_twin(w_t)),
                    op, _shape_label(*w_t.shape), w_t.dtype)


def mm_plan(w_t: torch.Tensor, op: str = "matmul") -> Plan:
    """The proven row tiles for x @ w_t, measured once per (shape, strides, dtype, alignment,
    threads)."""
    return _mm_decided(w_t, op)[0]


def _bmm_decided(k: int, n: int, op: str) -> tuple[Plan, invariance.Verdict]:
    def prove():
        like = torch.empty(invariance.MAX_BATCH, k, n)
        # powers of two up to 512 rows: a prefill chunk's rows per KV head come in one call
        tiles = invariance.powers_of_two(invariance.TILE_CANDIDATES)
        return invariance.prove_tiles(lambda a, b: blas_bmm(a.contiguous(), b), like, tiles)

    return _decided(("bmm", op, k, n, torch.get_num_threads()), prove, op,
                    f"{_shape_label(k, n)} batch<={invariance.MAX_BATCH}", torch.float32)


def bmm_plan(k: int, n: int, op: str) -> Plan:
    """The proven row tiles for float32 [B, T, k] @ [B, k, n], any B up to MAX_BATCH."""
    return _bmm_decided(k, n, op)[0]


def _tiled_mm(x: torch.Tensor, w_t: torch.Tensor, plan: Plan,
              packed: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w_t [K, N] in the plan's row tiles (or in our own order); through w_t's
    packed copy where given (plan.twin: the same bits)."""
    if not plan.blas:
        return owned_mm(x, w_t)
    chunks = plan.chunks(x.shape[0])
    if len(chunks) == 1 and chunks[0][1] == chunks[0][2]:  # one tile, no padding
        return blas_mm(x, w_t) if packed is None else packed_mm(x, packed)
    outs = []
    for start, rows, tile in chunks:
        part = x[start:start + tile]
        if rows < tile:  # the last tile, padded with zero rows
            part = F.pad(part, (0, 0, 0, tile - rows))
        out = blas_mm(part, w_t) if packed is None else packed_mm(part, packed)
        outs.append(out[:rows])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def rows_bmm(a: torch.Tensor, b: torch.Tensor, op: str) -> torch.Tensor:
    """a [B, M, K] @ b [B, K, N] in float32 (b converted a batch chunk at a time, while it is in
    cache), in proven row tiles and batch chunks: each row's bits depend only on that row and
    its batch entry of b."""
    bsz, m, k = a.shape
    plan = bmm_plan(k, b.shape[2], op)
    if not plan.blas:
        return owned_mm(a, b)
    out = torch.empty(bsz, m, b.shape[2], dtype=torch.float32, device=a.device)
    chunks = plan.chunks(m)
    # one tile, no padding: the products go straight into out (not where a trainer
    # differentiates: autograd does not record products written into a given tensor)
    tracked = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    whole = chunks == ((0, m, m),) and not tracked
    parts = []
    for start, rows, tile in chunks:
        part = a[:, start:start + rows]
        if rows < tile:
            part = F.pad(part, (0, 0, 0, tile - rows))
        parts.append(part.contiguous())
    for lo in range(0, bsz, invariance.MAX_BATCH):
        hi = min(lo + invariance.MAX_BATCH, bsz)
        b_chunk = b[lo:hi].to(torch.float32)
        for (start, rows, _), part in zip(chunks, parts):
            if whole:
                blas_bmm(part[lo:hi], b_chunk, out=out[lo:hi])
            else:
                out[lo:hi, start:start + rows] = blas_bmm(part[lo:hi], b_chunk)[:, :rows]
    return out


_ones: dict[tuple, torch.Tensor] = {}


def _ones_column(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    if key not in _ones:
        _ones[key] = torch.ones(n, 1, dtype=dtype, device=device)
    return _ones[key]


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension: float32 in `kernels/native.c`'s order where it is built,
    otherwise (and for other dtypes) one tiled matmul with a column of ones."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    lib = native.library()
    if lib is not None and x.dtype == torch.float32 and x.device.type == "cpu":
        out = torch.empty(rows.shape[0])
        lib.row_sum(rows.data_ptr(), rows.shape[0], rows.shape[1], out.data_ptr(),
                    torch.get_num_threads())
        return out.reshape(x.shape[:-1])
    ones = _ones_column(x.shape[-1], x.dtype, x.device)
    return _tiled_mm(rows, ones, mm_plan(ones, "row_sum")).reshape(x.shape[:-1])


def matmul(x: torch.Tensor, w_t: torch.Tensor, op: str = "matmul") -> torch.Tensor:
    """x [M, K] @ w_t [K, N]; each output row depends only on its input row."""
    if _amx(x, w_t):
        return _amx_mm(x.contiguous(), w_t, amx_pack(w_t))
    return _tiled_mm(x.contiguous(), w_t, mm_plan(w_t, op))


def weight_matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """`matmul` for the engine's own weights (fixed until `forget_packed`): through a packed
    copy of w_t (the AMX kernel's, or oneDNN's where its plan proved the packed call gives the
    same bits)."""
    if _amx(x, w_t):
        return _amx_mm(x.contiguous(), w_t, _packed_weight(w_t, amx_pack))
    plan = mm_plan(w_t, "linear")
    packed = _packed_weight(w_t) if plan.twin else None
    return _tiled_mm(x.contiguous(), w_t, plan, packed)


# ---------------------------------------------------------------- bfloat16 linears on AMX
#
# Where the CPU has AMX tiles (Intel Xeon since Sapphire Rapids), bfloat16 linears run
# kernels/native.c's `amx_linear`, whose order per row is its own (K in chunks of 1024 products
# summed by the tiles from zero, the chunks' sums added in order): every row count takes the one
# kernel, fastest at decode's few rows. oneDNN's AMX kernels sum in that order too at some large
# row counts; row tiles of AMX_BIG_TILES where a proof (`invariance.agreeing_tiles`) saw its call
# give the kernel's bits take the whole tiles of a long prefill chunk, where oneDNN is faster.

AMX_BIG_TILES = (512, 1024, 2048)
_amx_tiles: dict[tuple, tuple[tuple[int, ...], invariance.Verdict]] = {}


def _amx(x: torch.Tensor, w_t: torch.Tensor) -> bool:
    return (x.dtype == w_t.dtype == torch.bfloat16 and x.device.type == w_t.device.type == "cpu"
            and w_t.shape[1] >= DNN_MIN_COLUMNS and native.amx() is not None)


def amx_pack(w_t: torch.Tensor) -> torch.Tensor:
    """w_t [K, N] in the AMX kernel's tile layout."""
    k, n = w_t.shape
    out = torch.empty(-(-n // 16) * -(-k // 32) * 512, dtype=torch.bfloat16)
    native.amx().amx_pack(w_t.data_ptr(), k, n, *w_t.stride(), out.data_ptr(),
                          torch.get_num_threads())
    return out


def amx_linear(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] (rows contiguous) @ the packed w_t, [M, N], in the kernel's order."""
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    if x.shape[0] and native.amx().amx_linear(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0),
                               packed.data_ptr(), n, out.data_ptr(), n, torch.get_num_threads()):
        raise MemoryError(f"no memory for the AMX kernel's copy of {x.shape[0]} rows")
    return out


def _amx_decided(w_t: torch.Tensor) -> tuple[tuple[int, ...], invariance.Verdict]:
    """The AMX_BIG_TILES whose oneDNN call gives the kernel's bits, largest first, proven once
    per (shape, strides, alignment, threads)."""
    key = (tuple(w_t.shape), w_t.stride(), w_t.data_ptr() % 64, torch.get_num_threads())
    if key not in _amx_tiles:
        def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return amx_linear(a, amx_pack(b), b.shape[1])
        # a vocabulary's projection mostly takes few rows (one per sequence and step): its
        # oneDNN tiles, seconds each to try, are not worth proving
        wide = w_t.numel() > invariance.LARGE_OPERAND
        tiles = () if wide else invariance.agreeing_tiles(torch.mm, reference, w_t,
                                                          AMX_BIG_TILES)
        tiles = tuple(sorted(tiles, reverse=True))
        big = f"; oneDNN row tiles of {', '.join(map(str, tiles))} agree" if tiles else ""
        _amx_tiles[key] = tiles, invariance.record(
            "linear", _shape_label(*w_t.shape), w_t.dtype,
            f"owned order per row (kernels/native.c, AMX tiles){big}", True)
    return _amx_tiles[key]


def _amx_mm(x: torch.Tensor, w_t: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w_t: whole proven oneDNN tiles (the largest that fit first), the rest
    through the kernel."""
    parts, start = [], 0
    for tile in _amx_decided(w_t)[0]:
        while x.shape[0] - start >= tile:
            parts.append(torch.mm(x[start:start + tile], w_t))
            start += tile
    if start < x.shape[0] or not parts:
        parts.append(amx_linear(x[start:], packed, w_t.shape[1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def prepare(linears, row_lengths, head_dim: int, split: int,
            dtype: torch.dtype) -> list[invariance.Verdict]:
    """Prove, at engine start, every shape the forward will run (so no proof runs inside a
    step): the linears [(weight, splits or None)], the row sums of these lengths, and the
    attention products. Returns their verdicts."""
    verdicts = []
    for w, splits in linears:
        parts = [w] if splits is None else composite.weight_parts(w, splits)
        for w_t in (part.t() for part in parts):
            if _amx(w_t, w_t):
                verdicts.append(_amx_decided(w_t)[1])
            else:
                verdicts.append(_mm_decided(w_t, "linear")[1])
    for n in row_lengths:
        if native.library() is not None:
            verdicts.append(invariance.record("row_sum", f"N={n}", torch.float32,
                                              "owned order per row (kernels/native.c)", True))
            continue
        verdicts.append(_mm_decided(_ones_column(n, torch.float32, torch.device("cpu")),
                                    "row_sum")[1])
    if _native(dtype, head_dim, split) is not None:
        verdicts.append(invariance.record("attention", f"D={head_dim} S={split}", dtype,
                                          "owned order per row (kernels/native.c)", True))
        return list(dict.fromkeys(verdicts))
    verdicts.append(_bmm_decided(head_dim, split, "attention q.k")[1])
    verdicts.append(_bmm_decided(split, head_dim, "attention p.v")[1])
    verdicts.append(invariance.record("attention softmax sums", f"S={split}", torch.float32,
                                      "owned order (pairwise tree)", True))
    return list(dict.fromkeys(verdicts))


# ---------------------------------------------------------------- attention
#
# Keys are split into blocks of a fixed size S at absolute positions 0, S, 2S, ... (one KV-cache
# block is one split). The cache stores K transposed per block ([blocks, kv_heads, head_dim, S])
# and V as [blocks, kv_heads, S, head_dim], so both products are `rows_bmm` calls on contiguous
# tiles. The softmax takes two passes over a row's splits, every step elementwise or exact:
#   scores_j = (q * scale) . K_j, keys after the query masked to -inf
#   m = max over every split (exact), p_j = exp(scores_j - m)
#   l = sum_j tree_sum(p_j) in split order;  acc = sum_j p_j @ V_j in split order
# Splits past the row's last visible one add exactly 0 to l and are skipped for acc, so a query's
# bits are the same in decode, prefill and scoring, whatever rows and splits share its calls.

ATTENTION_ELEMENTS = 1 << 23  # scores held at once (per chunk of rows or sequences)
PREFILL_CHUNK = 64  # query positions per chunk of a prefill (see _dense_rows_attend)
REUSED_BLOCK_BYTES = 64 << 20  # float32 K/V blocks of a prefill kept for all its chunks
SUBNORMAL_EXP = -87.0  # weights of scores this far under the maximum (or further) are 0


NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # K/V dtypes kernels/native.c reads
NATIVE_MAX_D, NATIVE_MAX_S = 512, 256  # S: its MAX_S (a row's scores on the stack); D: ours


def _native(dtype: torch.dtype, head_dim: int, size: int):
    """The fixed-order C kernel where it is built and takes K/V of this dtype and shape, else
    None (the torch ops below). Decode, prefill and a trainer's scoring decide alike."""
    lib = native.library()
    fits = dtype in NATIVE_DTYPES and head_dim <= NATIVE_MAX_D and size <= NATIVE_MAX_S
    return lib.attend if lib is not None and fits else None


def _native_attend(fn, q: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """q [rows, H, D] at `positions` [rows], row r's block table tables[r] (or tables, 1-D,
    for every row), through `kernels/native.c`. Returns [rows, H, D] in q's dtype."""
    rows, heads, d = q.shape
    kv_heads, size = v_cache.shape[1], v_cache.shape[2]
    if not (k_cache[:1].is_contiguous() and v_cache[:1].is_contiguous()) \
            or k_cache.stride(0) != v_cache.stride(0) or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"K/V caches of strides {k_cache.stride()} / {v_cache.stride()} and "
                         f"dtypes {k_cache.dtype} / {v_cache.dtype}: the kernel reads blocks "
                         "of dense [kv_heads, D, S] / [kv_heads, S, D] of one dtype")
    out = torch.empty(rows, heads, d)
    if rows == 0:
        return out.to(q.dtype)
    q_scaled = (q.to(torch.float32) * scale).contiguous()
    positions = positions.to(torch.int64).contiguous()
    tables = tables.to(torch.int64).contiguous()
    stride = tables.shape[1] if tables.dim() == 2 else 0
    failed = fn(q_scaled.data_ptr(), positions.data_ptr(), tables.data_ptr(), stride,
                k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                int(k_cache.dtype == torch.bfloat16), rows, heads, kv_heads, d, size,
                out.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("attention kernel: out of memory for its scratch or threads")
    return out.to(q.dtype)


_last_checked: dict[str, tuple] = {}  # per check: weakrefs to the tensors it last passed, and
# their versions and sizes


def _version(t: torch.Tensor) -> int:
    """In-place writes bump it; inference tensors (the engine's, made anew each step) have none."""
    return -1 if t.is_inference() else t._version


def _passed_before(check: str, tensors: tuple[torch.Tensor, ...], sizes: tuple) -> bool:
    """Whether `check` last passed on these very tensors, unwritten since, with these sizes
    (every layer of a step passes the same ones: checked once per step). If not, the caller
    checks and then calls `_passed`."""
    last = _last_checked.get(check)
    return (last is not None and all(r() is t for r, t in zip(last[0], tensors))
            and last[1] == (*map(_version, tensors), *sizes))


def _passed(check: str, tensors: tuple[torch.Tensor, ...], sizes: tuple) -> None:
    _last_checked[check] = (tuple(map(weakref.ref, tensors)), (*map(_version, tensors), *sizes))


def _check_reads(source: torch.Tensor, shift: int, tables: torch.Tensor, rows: int, heads: int,
                 kv_heads: int, size: int, num_blocks: int) -> None:
    """The C kernel reads where positions (source - shift) and block tables point: refuse what
    points outside the cache (an error naming it, where a raw read would crash the process).
    Once per step: every layer passes the same tensors."""
    sizes = (shift, rows, heads, kv_heads, size, num_blocks)
    if _passed_before("reads", (source, tables), sizes):
        return
    positions = source - shift
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    if positions.shape != (rows,) or (tables.dim() == 2 and tables.shape[0] != rows):
        raise ValueError(f"positions {tuple(positions.shape)} and block tables "
                         f"{tuple(tables.shape)} do not match {rows} query rows")
    low, high = torch.aminmax(positions)
    if low < 0 or int(high) // size >= tables.shape[-1]:
        raise ValueError(f"positions {int(low)}..{int(high)} need {int(high) // size + 1} "
                         f"blocks; the block tables hold {tables.shape[-1]}")
    first, last = torch.aminmax(tables)
    if first < 0 or last >= num_blocks:
        raise ValueError(f"block ids {int(first)}..{int(last)} outside the cache's "
                         f"{num_blocks} blocks")
    _passed("reads", (source, tables), sizes)


def _dense_tiles(k: torch.Tensor, v: torch.Tensor, size: int):
    """k/v [L, kv_heads, D] of one contiguous sequence as cache blocks in float32 (exact for
    bfloat16): K [splits, kv_heads, D, S] and V [splits, kv_heads, S, D], zero padded."""
    length, kv_heads, d = k.shape
    num_splits = (length + size - 1) // size
    padded = num_splits * size
    k = F.pad(k, (0, 0, 0, 0, 0, padded - length)).reshape(num_splits, size, kv_heads, d)
    v = F.pad(v, (0, 0, 0, 0, 0, padded - length)).reshape(num_splits, size, kv_heads, d)
    return (k.permute(0, 2, 3, 1).to(torch.float32).contiguous(),
            v.permute(0, 2, 1, 3).to(torch.float32).contiguous())


def _reference_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Plain differentiable causal attention, q [L, H, D], k/v [L, kv_heads, D]: the backward
    of the native kernel (gradients are correct, not batch invariant, as everywhere)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,mhd->hlm", q, k) * scale
    length = q.shape[0]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.einsum("hlm,mhd->lhd", weights, v)


def _native_causal(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   size: int) -> torch.Tensor:
    k_tiles, v_tiles = _dense_tiles(k, v, size)
    positions = torch.arange(q.shape[0], device=q.device)
    table = torch.arange(k_tiles.shape[0], device=q.device)
    return _native_attend(fn, q, positions, table, k_tiles, v_tiles, scale)


class _NativeCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, size, fn):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return _native_causal(fn, q, k, v, scale, size)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().to(torch.float32).requires_grad_() for t in (q, k, v)]
            out = _reference_causal(*leaves, ctx.scale)
            grads = torch.autograd.grad(out, leaves, grad.to(torch.float32))
        return (*(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), None, None, None)


def _key_positions(splits: int, size: int, device) -> torch.Tensor:
    return torch.arange(splits * size, device=device).view(splits, size)


def _probs(scores: torch.Tensor, q_pos: torch.Tensor, size: int):
    """scores [..., J, S] for rows at q_pos (broadcasting to scores' leading dims: the fewer
    positions given, the smaller the mask): the masked two-pass weights p [..., J, S] and
    their total l [...]."""
    keys = _key_positions(scores.shape[-2], size, scores.device)
    scores = torch.where(keys > q_pos[..., None, None], float("-inf"), scores)
    scores = scores - scores.amax(dim=(-2, -1), keepdim=True)
    # weights of exp(x <= -87), below the smallest normal float, are 0: exp is 20x slower on
    # subnormal results, and a sum of at least 1 (the maximum's weight) cannot see them
    # (out-of-place ops throughout: a trainer differentiates through this)
    p = torch.exp(F.threshold(scores, SUBNORMAL_EXP, float("-inf")))
    sums = tree_sum(p)
    l = sums[..., 0]
    for j in range(1, sums.shape[-1]):
        l = l + sums[..., j]
    return p, l


def _combine(pv: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """pv [m, J, ..., D]: p_j @ V_j of each sequence's splits, in split order; the splits a
    sequence does not see hold -0.0, which adds nothing (x + -0.0 is x, bit for bit, zeros of
    both signs included), so each row sums exactly its visible splits, as prefill does."""
    acc = pv[:, 0].clone()
    for j in range(1, pv.shape[1]):
        acc += pv[:, j]
    return acc / l.unsqueeze(-1)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, kv_heads, D] into one layer's cache at flat slots (block * S + offset)."""
    size = v_cache.shape[2]
    tokens, kv_heads, d = k.shape
    if slot_mapping.shape != (tokens,) or tuple(v.shape) != (tokens, kv_heads, d):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and slots "
                         f"{tuple(slot_mapping.shape)} do not match")
    capacity = k_cache.shape[0] * size
    if tokens and not _passed_before("slots", (slot_mapping,), (capacity,)):
        low, high = torch.aminmax(slot_mapping)
        if low < 0 or high >= capacity:
            raise ValueError(f"slots {int(low)}..{int(high)} outside the cache's {capacity}")
        _passed("slots", (slot_mapping,), (capacity,))
    lib = native.library()
    if (lib is not None and k_cache.device.type == "cpu" and k_cache.is_contiguous()
            and v_cache.is_contiguous() and k_cache.element_size() in (2, 4)):
        slots = slot_mapping.to(torch.int64).contiguous()
        for src, cache, transposed in ((k, k_cache, 1), (v, v_cache, 0)):
            src = src.to(cache.dtype).contiguous()
            lib.store(src.data_ptr(), cache.data_ptr(), slots.data_ptr(), tokens, kv_heads, d,
                      size, cache.element_size(), transposed, torch.get_num_threads())
        return
    blocks, offsets = slot_mapping // size, slot_mapping % size
    k_cache[blocks, :, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets, :] = v.to(v_cache.dtype)


_last_plan: list = [(lambda: None, None)]  # [(weakref to the block tables, their plan)]
# Decode reads each cache block where it lies, in runs of nearby blocks: one product per run, so
# the fewer runs the fewer calls (each run is ~20 small ops). A run spans gaps of up to RUN_GAP
# unused blocks (reading them costs less than another run) and gives every block the same
# number of reader slots: the readers' count rounded up to a power of two (`rows_bmm` pads a
# product's rows to the plan's smallest tile, so few readers cost no more than that).
RUN_GAP = 8


@dataclass(frozen=True)
class _Run:
    """Cache blocks [start, start + length), read in place by one product; each block has
    `slots` reader slots, each holding a sequence and a (sequence, split) pair, or the padding
    row (index m of the queries, m * splits of the pairs), whose result is dropped into a spare
    row of the output."""
    start: int
    length: int
    slots: int
    seqs: torch.Tensor  # [length * slots]
    pairs: torch.Tensor  # [length * slots]


def _slots(readers: int) -> int:
    return 1 << (readers - 1).bit_length()


def _runs(readers: dict[int, list[int]], slots: int, m: int, splits: int, device) -> list[_Run]:
    """The blocks (with their reader pairs) of one slot count, cut into runs of nearby ids."""
    blocks = sorted(readers)
    pad = m * splits
    runs, first = [], 0
    for i in range(1, len(blocks) + 1):
        if i < len(blocks) and blocks[i] - blocks[i - 1] <= RUN_GAP + 1:
            continue
        start, end = blocks[first], blocks[i - 1] + 1
        pairs = []
        for block in range(start, end):
            taken = readers.get(block, [])
            pairs += taken + [pad] * (slots - len(taken))
        pairs_t = torch.tensor(pairs, device=device)
        runs.append(_Run(start, end - start, slots,
                         torch.div(pairs_t, splits, rounding_mode="floor"), pairs_t))
        first = i
    return runs


def _decode_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, size: int,
                 heads: int) -> list:
    """Chunks of sequences (lo, hi, splits, runs, unseen) whose scores fit ATTENTION_ELEMENTS;
    in each, the (sequence, split) pairs that read each block, pair = local sequence * splits +
    split, a block shared by c sequences (a GRPO group's prompt) read once for all of them; the
    blocks cut into `_Run`s; and the pairs past their sequence's last split. Made once per step:
    every layer has the same block tables."""
    ref, plan = _last_plan[0]
    if ref() is block_tables:
        return plan
    tables, lens = block_tables.tolist(), context_lens.tolist()
    plan, lo = [], 0
    while lo < len(lens):
        hi, splits = lo, 0
        while hi < len(lens):
            wider = max(splits, -(-lens[hi] // size))
            if hi > lo and (hi + 1 - lo) * wider * size * heads > ATTENTION_ELEMENTS:
                break
            hi, splits = hi + 1, wider
        readers: dict[int, list[int]] = {}
        unseen = []
        for i in range(lo, hi):
            seen = -(-lens[i] // size)
            for s in range(seen):
                readers.setdefault(tables[i][s], []).append((i - lo) * splits + s)
            unseen += range((i - lo) * splits + seen, (i - lo + 1) * splits)
        by_slots: dict[int, dict[int, list[int]]] = {}
        for block, pairs in readers.items():
            by_slots.setdefault(_slots(len(pairs)), {})[block] = pairs
        runs = [run for slots, group in sorted(by_slots.items())
                for run in _runs(group, slots, hi - lo, splits, block_tables.device)]
        plan.append((lo, hi, splits, runs, torch.tensor(unseen, dtype=torch.long,
                                                        device=block_tables.device)))
        lo = hi
    _last_plan[0] = (weakref.ref(block_tables), plan)
    return plan


def _grouped(x: torch.Tensor, rows: torch.Tensor, c: int) -> torch.Tensor:
    """Rows that share a block, stacked: [P, H, g, X] -> [U * H, c * g, X]."""
    u = rows.numel() // c
    _, h, g, last = x.shape
    out = x.index_select(0, rows).reshape(u, c, h, g, last).transpose(1, 2)
    return out.reshape(u * h, c * g, last)


def _ungrouped(y: torch.Tensor, c: int, h: int, g: int) -> torch.Tensor:
    """Inverse of `_grouped`: [U * H, c * g, X] -> [U * c, H, g, X]."""
    u = y.shape[0] // h
    return y.reshape(u, h, c, g, y.shape[-1]).transpose(1, 2).reshape(u * c, h, g, y.shape[-1])


def _per_block(x: torch.Tensor, cache: torch.Tensor, runs: list[_Run], out: torch.Tensor,
               op: str, by_sequence: bool = False) -> None:
    """out[pair] = x[pair] @ cache[block] for every block of the runs, out [P + 1, H, g, Y] (row
    P takes the padding's results); x [P, H, g, X], or [sequences, H, g, X] (by_sequence: the
    pair's query is its sequence's). Each run reads its blocks where they lie in the cache."""
    _, h, g, _ = x.shape
    x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # the padding row
    for run in runs:
        tiles = cache[run.start:run.start + run.length].reshape(-1, *cache.shape[2:])
        rows = _grouped(x, run.seqs if by_sequence else run.pairs, run.slots)
        products = rows_bmm(rows, tiles, op)
        out.index_copy_(0, run.pairs, _ungrouped(products, run.slots, h, g))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One new query per sequence. q [N, H, D]; block_tables [N, max_blocks]; context_lens [N]
    counts the keys, the query's own included. Returns [N, H, D] in q's dtype.

    Every (sequence, split) pair that reads a block is stacked with the others reading it into
    one `rows_bmm` (a row's bits do not depend on how many rows share the call)."""
    _check_reads(context_lens, 1, block_tables, q.shape[0], q.shape[1], v_cache.shape[1],
                 v_cache.shape[2], k_cache.shape[0])
    fn = _native(k_cache.dtype, q.shape[2], v_cache.shape[2])
    if fn is not None:
        return _native_attend(fn, q, context_lens - 1, block_tables, k_cache, v_cache, scale)
    n, h, d = q.shape
    kv_heads, size = v_cache.shape[1], v_cache.shape[2]
    g = h // kv_heads
    q4 = (q.to(torch.float32) * scale).reshape(n, kv_heads, g, d)
    out = torch.empty(n, kv_heads, g, d)
    for lo, hi, splits, runs, unseen in _decode_plan(block_tables, context_lens, size, h):
        m = hi - lo
        scores = torch.empty(m * splits + 1, kv_heads, g, size)
        _per_block(q4[lo:hi], k_cache, runs, scores, "attention q.k", by_sequence=True)
        scores = scores[:-1].view(m, splits, kv_heads, g, size).permute(0, 2, 3, 1, 4)
        q_pos = (context_lens[lo:hi] - 1).view(m, 1, 1)
        p, l = _probs(scores, q_pos, size)
        pv = torch.empty(m * splits + 1, kv_heads, g, d)
        _per_block(p.permute(0, 3, 1, 2, 4).reshape(m * splits, kv_heads, g, size), v_cache,
                   runs, pv, "attention p.v")
        # the unseen pairs' scores were never written: _probs masks them by position; their
        # p.v products are never made: -0.0 stands in
        pv.index_fill_(0, unseen, -0.0)
        out[lo:hi] = _combine(pv[:-1].view(m, splits, kv_heads, g, d), l)
    return out.reshape(n, h, d).to(q.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, positions: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """A run of consecutive queries of one sequence (a prefill chunk). q [L, H, D]; positions [L];
    block_table [num_blocks] covers every key up to the last position. Returns [L, H, D]."""
    _check_reads(positions, 0, block_table, q.shape[0], q.shape[1], v_cache.shape[1],
                 v_cache.shape[2], k_cache.shape[0])
    fn = _native(k_cache.dtype, q.shape[2], v_cache.shape[2])
    if fn is not None:
        return _native_attend(fn, q, positions, block_table, k_cache, v_cache, scale)
    kv_heads, size = v_cache.shape[1], v_cache.shape[2]
    num_splits = int(positions[-1].item()) // size + 1

    def stacked(n: int):
        blocks = block_table[:n]
        return (k_cache.index_select(0, blocks).to(torch.float32),
                v_cache.index_select(0, blocks).to(torch.float32))

    return _dense_rows_attend(q, positions, kv_heads, stacked, num_splits, size, scale)


def _attend_rows(q_rows: torch.Tensor, q_pos: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor,
                 size: int) -> torch.Tensor:
    """q_rows [B, R, D] float32 (scaled), q_pos [B, R] (ascending along R); k_t [J, B, D, S] and
    v [J, B, S, D] float32, the splits these rows see. Each product takes up to MAX_BATCH
    (split, head) pairs at once; a row's scores in a split past its position are masked to
    weight 0, and split j adds to a row's sum only where the row sees it (a suffix of the rows),
    as a decode query skips the splits past it."""
    splits, b, d, _ = k_t.shape
    r = q_rows.shape[1]
    per_call = max(1, invariance.MAX_BATCH // b)
    q_rep = q_rows.expand(min(splits, per_call), b, r, d).reshape(-1, r, d)  # one copy per split
    scores = q_rows.new_empty(b, r, splits, size)
    for lo in range(0, splits, per_call):
        hi = min(lo + per_call, splits)
        part = rows_bmm(q_rep[:(hi - lo) * b], k_t[lo:hi].reshape(-1, d, size), "attention q.k")
        scores[:, :, lo:hi] = part.view(hi - lo, b, r, size).permute(1, 2, 0, 3)
    p, l = _probs(scores, q_pos[:1], size)  # every head's rows sit at the same positions
    first = torch.searchsorted(q_pos[0], torch.arange(splits, device=q_pos.device) * size)
    first = first.tolist()
    for lo in range(0, splits, per_call):
        hi = min(lo + per_call, splits)
        weights = p[:, :, lo:hi].permute(2, 0, 1, 3).reshape(-1, r, size)
        pv = rows_bmm(weights, v[lo:hi].reshape(-1, size, d), "attention p.v")
        pv = pv.view(hi - lo, b, r, d)
        for j in range(lo, hi):  # in split order; split 0 is seen by every row
            if j == 0:
                acc = pv[0].clone()
            else:
                acc[:, first[j]:] += pv[j - lo, :, first[j]:]
    return acc / l.unsqueeze(-1)


def _dense_rows_attend(q, positions, kv_heads, stacked, num_splits, size, scale):
    """stacked(n) -> the first n splits' (k_t [n, kv_heads, D, S], v [n, kv_heads, S, D]) in
    float32, made once for the whole run when they fit in REUSED_BLOCK_BYTES."""
    length, h, d = q.shape
    group = h // kv_heads
    rows = length * group
    q_rows = ((q.to(torch.float32) * scale).reshape(length, kv_heads, group, d)
              .permute(1, 0, 2, 3).reshape(kv_heads, rows, d))
    q_pos = positions.repeat_interleave(group).unsqueeze(0).expand(kv_heads, -1)
    # rows in chunks of PREFILL_CHUNK positions: each chunk computes only the splits it sees,
    # a staircase over the causal triangle instead of the whole square
    step = max(1, min(ATTENTION_ELEMENTS // (kv_heads * num_splits * size),
                      PREFILL_CHUNK * group))
    k_and_v_bytes = num_splits * kv_heads * size * d * 2 * 4
    whole = stacked(num_splits) if k_and_v_bytes <= REUSED_BLOCK_BYTES else None
    out = torch.empty(kv_heads, rows, d)
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        last = int(q_pos[0, hi - 1].item()) // size + 1  # later splits are masked for these rows
        k_t, v = (whole[0][:last], whole[1][:last]) if whole else stacked(last)
        out[:, lo:hi] = _attend_rows(q_rows[:, lo:hi], q_pos[:, lo:hi], k_t, v, size)
    return (out.reshape(kv_heads, length, group, d).permute(1, 0, 2, 3)
            .reshape(length, h, d).to(q.dtype))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     split_size: int) -> torch.Tensor:
    """Causal self-attention of one contiguous sequence, bitwise what the paged kernels give.
    q [L, H, D], k/v [L, kv_heads, D]. For trainers scoring whole sequences (differentiable)."""
    fn = _native(k.dtype, k.shape[2], split_size)
    if fn is not None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _NativeCausal.apply(q, k, v, scale, split_size, fn)
        return _native_causal(fn, q, k, v, scale, split_size)
    length, kv_heads, _ = k.shape
    k_tiles, v_tiles = _dense_tiles(k, v, split_size)
    positions = torch.arange(length, device=q.device)
    return _dense_rows_attend(q, positions, kv_heads, lambda n: (k_tiles[:n], v_tiles[:n]),
                              k_tiles.shape[0], split_size, scale)


# ---------------------------------------------------------------- composite ops on row_sum
linear = partial(composite.linear, weight_matmul)
plain_linear = partial(composite.linear, partial(matmul, op="linear"))
mean_last = partial(composite.mean_last, row_sum)
softmax_parts = partial(composite.softmax_parts, row_sum)
log_softmax = partial(composite.log_softmax, row_sum)
silu, silu_and_mul = composite.silu, composite.silu_and_mul


def _elementwise_lib(x: torch.Tensor, *others: torch.Tensor):
    """The C kernels for a one-pass op on x and `others` (CPU tensors of x's dtype, float32 or
    bfloat16, no gradient wanted), or None: the composite torch sequence runs instead."""
    lib = native.library()
    tensors = (x, *others)
    if (lib is None or x.dtype not in NATIVE_DTYPES or x.device.type != "cpu"
            or any(t.dtype != x.dtype or t.device != x.device for t in others)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return None
    return lib


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """composite.rms_norm, in one pass of `kernels/native.c` where it is built (op for op the
    same, so the same bits; the test holds them to the torch sequence a trainer runs)."""
    lib = _elementwise_lib(x, weight)
    if lib is None or weight.shape != x.shape[-1:]:
        return composite.rms_norm(row_sum, x, weight, eps)
    rows = x.contiguous()
    out = torch.empty_like(rows)
    n = x.shape[-1]
    if lib.rms_norm(rows.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(),
                    rows.numel() // max(n, 1), n, eps, int(x.dtype == torch.bfloat16),
                    torch.get_num_threads()):
        raise MemoryError("rms_norm kernel: out of memory for its scratch")
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """composite.rotate in one pass of `kernels/native.c` where it is built (op for op the
    same). x [T, H, D]; cos, sin [T, 1, D] of x's dtype."""
    lib = _elementwise_lib(x, cos, sin)
    t, h, d = x.shape
    if lib is None or d % 2 or cos.shape != (t, 1, d) or sin.shape != (t, 1, d):
        return composite.rotate(x, cos, sin)
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    lib.rotate(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), t, h, d,
               int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out
