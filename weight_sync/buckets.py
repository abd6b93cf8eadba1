"""Flat buckets: many named tensors packed into one contiguous byte buffer plus a manifest.

Every transport moves buckets, and sender and receiver agree on the layout by calling
`plan_buckets` on the same manifest."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 512 << 20
ALIGN = 256

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        n = dtype_from_name(self.dtype).itemsize
        for s in self.shape:
            n *= s
        return n

    def to_wire(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.offset]

    @classmethod
    def from_wire(cls, w: list) -> "TensorMeta":
        return cls(w[0], w[1], tuple(w[2]), w[3] if len(w) > 3 else 0)

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorMeta":
        return cls(name, dtype_name(tensor.dtype), tuple(tensor.shape))


@dataclass
class Bucket:
    """`buffer` (uint8, 1-D) holds each tensor of `metas` at its offset."""
    buffer: torch.Tensor
    metas: list[TensorMeta]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return unpack(self.buffer, self.metas)


def plan_buckets(metas: Iterable[TensorMeta],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[TensorMeta]]:
    """Assign offsets, starting a new bucket when the next tensor would not fit (a tensor larger
    than `bucket_bytes` gets a bucket of its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    plan: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    offset = 0
    for m in metas:
        start = -(-offset // ALIGN) * ALIGN
        if current and start + m.nbytes > bucket_bytes:
            plan.append(current)
            current, start = [], 0
        current.append(TensorMeta(m.name, m.dtype, m.shape, start))
        offset = start + m.nbytes
    if current:
        plan.append(current)
    return plan


def bucket_size(metas: list[TensorMeta]) -> int:
    return max((m.offset + m.nbytes for m in metas), default=0)


def pack(named: dict[str, torch.Tensor], metas: list[TensorMeta],
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy tensors into one byte buffer at their planned offsets (into `out` if given)."""
    size = bucket_size(metas)
    if out is None:
        device = next(iter(named.values())).device if named else "cpu"
        out = torch.empty(size, dtype=torch.uint8, device=device)
    for m in metas:
        src = named[m.name].detach().contiguous().view(-1).view(torch.uint8)
        out[m.offset:m.offset + m.nbytes].copy_(src)
    return out


def unpack(buffer: torch.Tensor, metas: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into `buffer` (no copy); a buffer too short for them is refused before the first."""
    need = bucket_size(metas)
    if buffer.numel() < need:
        raise ValueError(f"a bucket of {buffer.numel()} bytes cannot hold its tensors "
                         f"({need} bytes: {metas[0].name} ... {metas[-1].name})")
    for m in metas:
        raw = buffer[m.offset:m.offset + m.nbytes]
        yield m.name, raw.view(dtype_from_name(m.dtype)).view(m.shape)


def make_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[Bucket]:
    named = dict(named_tensors)
    for metas in plan_buckets([TensorMeta.of(n, t) for n, t in named.items()], bucket_bytes):
        yield Bucket(pack(named, metas), metas)
