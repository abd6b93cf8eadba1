"""Proofs, measured on this machine, that a BLAS call gives each row bits that depend only on
that row; and the report of what every op runs.

Vendor BLAS picks its kernel by problem shape, operand strides, thread count and CPU, so a row's
bits can depend on how many rows came with it (MKL on AMD Zen: 1-3 rows differ from 4 or more;
on Intel Xeon: 1 row differs from 2 or more). Nothing about that is assumed here. A BLAS call is
only ever made with a fixed row tile T (rows padded with zeros up to T), and before a shape is
used each candidate T is run against a probe operand with the real operand's shape, strides,
dtype and address alignment, whose values make any change of summation order show in the result
(products that cancel in pairs, over many binades, so even bfloat16 outputs differ):

- every row position of the tile against its neighbour (the tile rolled by one row, starting at
  another address), chaining all T positions;
- for batched calls, every batch count of `BATCH_COUNTS` against the largest one;
- row 0 against the same row computed in a tile of probe rows padded with zeros (alone, where
  the operand is wide), whose bits are the tile's class signature.

Tiles that pass and give the probe rows (`SIGNATURE_ROWS`, or fewer where each has enough
columns for `SIGNATURE_ELEMENTS` outputs) the same bits form a class; every row count is covered
by tiles of the one class chosen. A BLAS may keep several (oneDNN's AMX kernels on Intel Xeon:
rows 1-32, 40-176, 192-256 and 320-512 of one shape, each sum their own way); the plan is the
class that covers the row counts of decode batches and prefill chunks (`ROW_COUNTS`) at the
least modeled cost, a call costing its tile plus `CALL_OVERHEAD_ROWS`. Tile sizes only, never
timings: every process on the machine (the engine, the trainer under the mode) picks the same
class. Where no tile passes, the op runs an implementation that owns its reduction order (exact,
slower) and the report says so.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Row tiles tried, dense enough that a row count pads by at most a fifth of it (or 3 rows): a
# BLAS call's cost grows with its rows, so padding 43 rows to 64 would waste a third of a decode
# step's matmuls. Batched products try the powers of two only (their proofs run many batch
# counts).
TILE_CANDIDATES = (1, 2, *range(4, 64, 4), *range(64, 128, 8), *range(128, 256, 16),
                   *range(256, 513, 64))
LARGE_OPERAND = 1 << 26  # elements: each call of a tile takes tens of ms; fewer tiles, <= 128,
# every 4 rows up to 64 (decode batches: padding 52 rows to 64 costs a vocabulary projection 20%)
LARGE_TILE_CANDIDATES = (1, 2, *range(4, 65, 4), 80, 96, 128)
MAX_BATCH = 256
BATCH_COUNTS = (1, 2, 3, 4, 7, 16, 64, MAX_BATCH - 1, MAX_BATCH)
SIGNATURE_ROWS = 32  # at most; fewer rows where each has many columns
SIGNATURE_ELEMENTS = 4096
# Choosing among classes: row counts from one decode row to a long prefill chunk, each octave
# weighted alike; a call's cost in rows is its tile plus a fixed overhead (reading the weight
# and setting up the call take as long as tens of rows of arithmetic).
ROW_COUNTS = tuple(2 ** i for i in range(12))
CALL_OVERHEAD_ROWS = 64


@dataclass(frozen=True)
class Plan:
    """How an op calls BLAS: row tiles of one proven class (ascending), and the seconds one
    call of each took on this machine; no tiles = owned order. Every tile of the class gives a
    row the same bits wherever it sits, so how rows are cut into tiles is free: `chunks` picks
    the cut the measured costs say is fastest."""
    tiles: tuple[int, ...]
    costs: tuple[float, ...] = ()
    twin: bool = False  # a second call (`prove_tiles`'s twin) gives every tile the same bits
    _best: dict = field(default_factory=dict, compare=False, repr=False)
    _covers: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def blas(self) -> bool:
        return bool(self.tiles)

    def _cost(self, i: int) -> float:
        # without measurements, a call costs its rows (bigger tiles, fewer calls)
        return self.costs[i] if self.costs else self.tiles[i] * (1 - 1e-3 * i)

    def _choice(self, rows: int) -> int:
        """The tile that starts the cheapest cover of `rows` (the last one padded with zeros);
        dynamic programming over remainders, memoized on the plan."""
        best = self._best
        if not best:
            best[0] = (0.0, 0)
        for r in range(len(best), rows + 1):
            best[r] = min(((self._cost(i) + best[max(r - t, 0)][0], t)
                           for i, t in enumerate(self.tiles)), key=lambda ct: (ct[0], -ct[1]))
        return best[rows][1]

    @property
    def horizon(self) -> int:
        return 4 * self.tiles[-1]

    def cover_all(self) -> None:
        """Work out the cheapest cover of every row count up to the horizon now (at engine
        start: tens of ms for a plan of many tiles, which a step should not pay)."""
        if self.blas:
            self._choice(self.horizon)

    def chunks(self, rows: int) -> tuple[tuple[int, int, int], ...]:
        """(start, rows taken, tile) covering `rows` at the least measured cost: past a few
        largest tiles, the tile with the cheapest row repeats; the rest is the cheapest cover.
        Memoized per row count (every linear of a step asks for the same one)."""
        got = self._covers.get(rows)
        if got is None:
            got = self._covers[rows] = tuple(self._cover(rows))
        return got

    def _cover(self, rows: int) -> list[tuple[int, int, int]]:
        horizon = self.horizon
        per_row = min(range(len(self.tiles)), key=lambda i: self._cost(i) / self.tiles[i])
        out, i = [], 0
        while rows - i > horizon:
            out.append((i, self.tiles[per_row], self.tiles[per_row]))
            i += self.tiles[per_row]
        while i < rows:
            tile = self._choice(rows - i)
            out.append((i, min(tile, rows - i), tile))
            i += tile
        return out

    def describe(self) -> str:
        if not self.blas:
            return "owned reduction order (no BLAS tile proved invariant)"
        twin = " (packed weights: the same bits)" if self.twin else ""
        if len(self.tiles) <= 8:
            return f"BLAS, row tiles {','.join(map(str, self.tiles))}{twin}"
        return f"BLAS, {len(self.tiles)} row tiles {self.tiles[0]}..{self.tiles[-1]}{twin}"


@dataclass(frozen=True)
class Verdict:
    """One row of the determinism report."""
    op: str
    shape: str
    dtype: str
    threads: int
    method: str
    guaranteed: bool


# run(a, batch) computes a [B, T, K] against the probe operand's batch entries `batch` (a slice
# of length B) and returns [B, T, N]; for a single-matrix operand the slice is always 0:1.
Run = Callable[[torch.Tensor, slice], torch.Tensor]
# product(a [B, T, K], b [B, K, N] or [K, N]) -> [B, T, N]: the BLAS call being proven.
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_verdicts: dict[tuple, Verdict] = {}


def _tile_holds(run: Run, a: torch.Tensor, full: torch.Tensor,
                batch_counts: tuple[int, ...]) -> bool:
    """For the tile a [B, T, K] whose result is `full`: every row position against its
    neighbour (the tile rolled by one row, at another address), and every batch count."""
    b, t = a.shape[:2]
    shifted = torch.empty(b, t + 1, a.shape[2], dtype=a.dtype)[:, 1:]
    shifted.copy_(a.roll(1, dims=1))
    rolled = run(shifted, slice(0, b))
    if not (torch.equal(rolled[:, 1:], full[:, :-1]) and torch.equal(rolled[:, 0], full[:, -1])):
        return False
    if b > 1 and not torch.equal(run(a[-1:].clone(), slice(b - 1, b)), full[-1:]):
        return False
    return all(torch.equal(run(a[:count].clone(), slice(0, count)), full[:count])
               for count in batch_counts if count < b)


def _signature(run: Run, rows: torch.Tensor, t: int) -> torch.Tensor:
    """`rows` [R, K] (batch entry 0) computed in tiles of t, zero-padded. Tiles giving the same
    bits form a class; enough outputs that two reduction orders which happen to agree on a few
    are still told apart."""
    outs = []
    for start in range(0, rows.shape[0], t):
        chunk = rows[start:start + t]
        tile = torch.zeros(1, t, rows.shape[1], dtype=rows.dtype)
        tile[0, :len(chunk)] = chunk
        outs.append(run(tile, slice(0, 1))[0, :len(chunk)])
    return torch.cat(outs)


def _cancelling(shape: tuple[int, ...], dtype: torch.dtype, pairs: tuple, sign: float,
                gen: torch.Generator) -> torch.Tensor:
    """Values over many binades whose products cancel in pairs along k (dim -2 of an operand,
    -1 of rows): the exact sum is near 0, so the result is the rounding of the partial sums and
    any change of summation order shows, even after rounding to bfloat16."""
    width = min(shape[-1], 4096)  # wide operands repeat their columns (only the shape matters)
    v = torch.randn(*shape[:-1], width, generator=gen)
    v.mul_(torch.randint(-8, 9, v.shape, generator=gen, dtype=torch.float32).exp2_())
    v = v.to(dtype)
    first, second = pairs
    if sign < 0:  # an operand: pairs along k = dim -2, before its columns repeat
        v[..., second, :] = -v[..., first, :]
    v = v.repeat(*[1] * (len(shape) - 1), -(-shape[-1] // width))[..., :shape[-1]]
    if sign > 0:  # rows: pairs along k = dim -1
        v[..., second] = v[..., first]
    return v


def _probe_like(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` in a tensor with like's shape, strides, dtype and address modulo 64 bytes."""
    elt = like.element_size()
    shift = (like.data_ptr() % 64) // elt
    span = 1 + sum((size - 1) * stride for size, stride in zip(like.shape, like.stride()))
    base = torch.empty(span + shift, dtype=like.dtype)
    probe = base[shift:].as_strided(like.shape, like.stride())
    probe.copy_(values)
    return probe


TIMING_BUDGET_S = 0.2  # per plan: rounds of calls of every tile, until this much is spent
MAX_TIMING_ROUNDS = 16


def _costs(run: Run, probe: torch.Tensor, tiles: tuple[int, ...]) -> tuple[float, ...]:
    """Seconds one call of each tile takes: the least over rounds that call every tile in turn.
    A machine's speed drifts over seconds (a shared host: 2x here), so tiles timed one after
    another would be compared across a drift; in turns, each round sees one speed."""
    best = [float("inf")] * len(tiles)
    calls = [probe[:, :t].contiguous() for t in tiles]
    spent, rounds = 0.0, 0
    while (spent < TIMING_BUDGET_S or rounds < 2) and rounds < MAX_TIMING_ROUNDS:
        for i, a in enumerate(calls):
            start = time.perf_counter()
            run(a, slice(0, a.shape[0]))
            elapsed = time.perf_counter() - start
            best[i], spent = min(best[i], elapsed), spent + elapsed
        rounds += 1
        if rounds == 1 and spent > 5 * TIMING_BUDGET_S:  # slow calls (a vocabulary): one round
            break
    return tuple(best)


def powers_of_two(tiles: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(t for t in tiles if t & (t - 1) == 0)


def _candidates(like: torch.Tensor) -> tuple[int, ...]:
    if like.numel() > LARGE_OPERAND:
        return LARGE_TILE_CANDIDATES
    if like.shape[-2] * max(TILE_CANDIDATES) > LARGE_OPERAND:  # long rows (a vocabulary's
        return powers_of_two(TILE_CANDIDATES)  # sum): each big tile reads much; fewer of them
    return TILE_CANDIDATES


def prove_tiles(product: Product, like: torch.Tensor,
                candidates: tuple[int, ...] | None = None, twin: Product | None = None) -> Plan:
    """The class of row tiles proven invariant for `product` against an operand like `like`
    ([K, N], or [B, K, N] for a batched call), the class of passing tiles with the least
    modeled cost (see the module docstring); an empty plan when no candidate passes. `twin`:
    another call of the same product (a single-matrix operand), checked to give every tile of
    the class the same bits as `product` on the probe (the plan's `twin`)."""
    candidates = candidates or _candidates(like)
    gen = torch.Generator().manual_seed(0)
    batched = like.dim() == 3
    k, n = like.shape[-2:]
    perm = torch.randperm(k, generator=gen)
    pairs = (perm[:k // 2], perm[k // 2:2 * (k // 2)])
    operand = _probe_like(like, _cancelling(tuple(like.shape), like.dtype, pairs, -1.0, gen))

    def run(a: torch.Tensor, batch: slice) -> torch.Tensor:
        return product(a, operand[batch] if batched else operand)

    b = like.shape[0] if batched else 1
    probe = _cancelling((b, max(candidates), k), like.dtype, pairs, 1.0, gen)
    rows = _cancelling((-(-SIGNATURE_ELEMENTS // n), k), like.dtype, pairs, 1.0, gen)
    rows = torch.cat([probe[0, :1], rows])[:SIGNATURE_ROWS]  # row 0: the probe's first row
    counts = BATCH_COUNTS if batched else ()
    classes: dict[bytes, list[int]] = {}
    agrees: dict[int, bool] = {}
    for t in candidates:
        a = probe[:, :t].contiguous()
        full = run(a, slice(0, b))
        if not _tile_holds(run, a, full, counts):
            continue
        agrees[t] = twin is not None and torch.equal(twin(a, operand), full)
        signature = _signature(run, rows, t)
        if torch.equal(signature[0], full[0, 0]):  # the first row alone (or among others)
            classes.setdefault(signature.float().numpy().tobytes(), []).append(t)
    if not classes:
        return Plan(())
    tiles = tuple(min(classes.values(), key=lambda ts: (modeled_cost(ts), -max(ts))))
    return Plan(tiles, _costs(run, probe, tiles), all(agrees[t] for t in tiles))


def agreeing_tiles(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   like: torch.Tensor, candidates: tuple[int, ...]) -> tuple[int, ...]:
    """The candidate row tiles T for which `product` (a [T, K] @ b [K, N]) gives every row of
    the probe the bits `reference` gives it, whose bits depend on a row alone (an order of our
    own): the probe's first T rows, and the T rows after its first (each row one place
    earlier in the call, at another address)."""
    gen = torch.Generator().manual_seed(0)
    k = like.shape[0]
    perm = torch.randperm(k, generator=gen)
    pairs = (perm[:k // 2], perm[k // 2:2 * (k // 2)])
    operand = _probe_like(like, _cancelling(tuple(like.shape), like.dtype, pairs, -1.0, gen))
    probe = _cancelling((max(candidates) + 1, k), like.dtype, pairs, 1.0, gen)
    want = reference(probe, operand)
    agree = []
    for t in candidates:
        shifted = probe[1:t + 1]
        if (torch.equal(product(probe[:t].clone(), operand), want[:t])
                and torch.equal(product(shifted, operand), want[1:t + 1])):
            agree.append(t)
    return tuple(agree)


def modeled_cost(tiles: list[int]) -> float:
    """How well a class of tiles covers `ROW_COUNTS`: per row count, the calls' modeled cost
    over that of one call of exactly those rows, summed."""
    plan = Plan(tuple(tiles), tuple(t + CALL_OVERHEAD_ROWS for t in tiles))
    return sum(sum(t + CALL_OVERHEAD_ROWS for _, _, t in plan.chunks(rows))
               / (rows + CALL_OVERHEAD_ROWS) for rows in ROW_COUNTS)


def record(op: str, shape: str, dtype: torch.dtype | str, method: str,
           guaranteed: bool) -> Verdict:
    threads = torch.get_num_threads()
    dtype = str(dtype).removeprefix("torch.")
    verdict = Verdict(op, shape, dtype, threads, method, guaranteed)
    _verdicts[(op, shape, dtype, threads)] = verdict
    return verdict


def verdicts() -> list[Verdict]:
    """Every op shape decided in this process so far."""
    return list(_verdicts.values())


def reset() -> None:
    """Forget every verdict (plans are cached by the backends, which reset them with this)."""
    _verdicts.clear()
