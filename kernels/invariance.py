"""Proofs, measured on this machine, that a BLAS call gives each row bits that depend only on
that row; and the report of what every op runs.

Vendor BLAS picks its kernel by problem shape, operand strides, thread count and CPU, so a row's
bits can depend on how many rows came with it (MKL on AMD Zen: 1-3 rows differ from 4 or more;
on Intel Xeon: 1 row differs from 2 or more). Nothing about that is assumed here. A BLAS call is
only ever made with a fixed row tile T (rows padded with zeros up to T), and before a shape is
used each candidate T is run on the real operand:

- every row position of the tile against its neighbour (the tile rolled by one row, starting at a
  different address), chaining all T positions, and row 0 against the same row alone in an
  otherwise zero tile (what a lone request runs);
- for batched calls, every batch count of `BATCH_COUNTS` against the largest one.

Tiles that pass and give each of `SIGNATURE_ROWS` probe rows the same bits form a class; the
plan is the class with the largest tile, so any row count is covered by tiles of one class.
Where no tile passes, the op runs an implementation that owns its reduction order (exact,
slower) and the report says so.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

TILE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_BATCH = 256
BATCH_COUNTS = (1, 2, 3, 4, 5, 7, 8, 16, 31, 64, 255, MAX_BATCH)
SIGNATURE_ROWS = 32


@dataclass(frozen=True)
class Plan:
    """How an op calls BLAS: row tiles of one proven class (ascending); none = owned order."""
    tiles: tuple[int, ...]

    @property
    def blas(self) -> bool:
        return bool(self.tiles)

    def chunks(self, rows: int) -> list[tuple[int, int, int]]:
        """(start, rows taken, tile) covering `rows`: the largest tile that fits, repeatedly;
        a remainder below the smallest tile is padded with zeros up to it."""
        out, i = [], 0
        while rows - i >= self.tiles[0]:
            tile = max(t for t in self.tiles if t <= rows - i)
            out.append((i, tile, tile))
            i += tile
        if i < rows:
            out.append((i, rows - i, self.tiles[0]))
        return out

    def describe(self) -> str:
        if not self.blas:
            return "owned reduction order (no BLAS tile proved invariant)"
        return f"BLAS, row tiles {','.join(map(str, self.tiles))}"


@dataclass(frozen=True)
class Verdict:
    """One row of the determinism report."""
    op: str
    shape: str
    dtype: str
    threads: int
    method: str
    guaranteed: bool


# run(a, batch) computes a [B, T, K] against the operand's batch entries `batch` (a slice of
# length B) and returns [B, T, N]; for a single-matrix operand the slice is always 0:1.
Run = Callable[[torch.Tensor, slice], torch.Tensor]

_verdicts: dict[tuple, Verdict] = {}


def _tile_holds(run: Run, a: torch.Tensor, batch_counts: tuple[int, ...]) -> bool:
    """Every check of the module docstring, for the tile size of a [B, T, K]."""
    b, t = a.shape[:2]
    full = run(a, slice(0, b))
    shifted = torch.empty(b, t + 1, a.shape[2], dtype=a.dtype)[:, 1:]
    shifted.copy_(a.roll(1, dims=1))
    rolled = run(shifted, slice(0, b))
    if not (torch.equal(rolled[:, 1:], full[:, :-1]) and torch.equal(rolled[:, 0], full[:, -1])):
        return False
    alone = torch.zeros_like(a[:1])
    alone[0, 0] = a[0, 0]
    if not torch.equal(run(alone, slice(0, 1))[0, 0], full[0, 0]):
        return False
    if b > 1 and not torch.equal(run(a[-1:].clone(), slice(b - 1, b)), full[-1:]):
        return False
    return all(torch.equal(run(a[:count].clone(), slice(0, count)), full[:count])
               for count in batch_counts if count < b)


def _signature(run: Run, rows: torch.Tensor, t: int) -> bytes:
    """The bits of `rows` [R, K] (batch entry 0) computed in tiles of t. Tiles giving the same
    bits form a class; many rows, so that two reduction orders which happen to agree on one row
    are still told apart."""
    outs = []
    for start in range(0, rows.shape[0], t):
        chunk = rows[start:start + t]
        tile = torch.zeros(1, t, rows.shape[1], dtype=rows.dtype)
        tile[0, :len(chunk)] = chunk
        outs.append(run(tile, slice(0, 1))[0, :len(chunk)])
    return torch.cat(outs).float().numpy().tobytes()


def prove_tiles(run: Run, k: int, dtype: torch.dtype, batch: int = 1,
                candidates: tuple[int, ...] | None = None) -> Plan:
    """The class of row tiles proven invariant for `run` (see the module docstring), the class
    holding the largest passing tile; an empty plan when no candidate passes."""
    candidates = candidates or TILE_CANDIDATES
    gen = torch.Generator().manual_seed(0)
    counts = BATCH_COUNTS if batch > 1 else ()
    probe = torch.randn(batch, max(candidates), k, generator=gen).to(dtype)
    rows = torch.randn(SIGNATURE_ROWS, k, generator=gen).to(dtype)
    classes: dict[bytes, list[int]] = {}
    for t in candidates:
        if _tile_holds(run, probe[:, :t].contiguous(), counts):
            classes.setdefault(_signature(run, rows, t), []).append(t)
    if not classes:
        return Plan(())
    return Plan(tuple(max(classes.values(), key=lambda ts: (max(ts), len(ts)))))


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
