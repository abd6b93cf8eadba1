"""`/update_weights_from_tensor` payloads, decoded without running what a client sends.

SGLang's payload is base64 of a `multiprocessing.reduction.ForkingPickler` dump whose tensors
cross by handle (CUDA IPC on GPU, torch's `file_system` sharing strategy on the CPU), described
by SGLang's `FlattenedTensorMetadata`. Unpickling calls whatever the pickle names, so it goes
through `weight_sync.safe_pickle`, which resolves only torch's tensor and storage rebuild
functions, torch dtypes, `torch.Size` and here SGLang's metadata class (mapped by name to our
dataclass); any other name is refused before anything runs.
"""

import base64
import binascii
import math
from dataclasses import dataclass

import torch

from weight_sync import safe_pickle

LOAD_FORMATS = ("flattened_bucket", None)
SGLANG_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")


class PayloadError(ValueError):
    """The payload is not tensors in SGLang's format; the message says what was wrong."""


@dataclass
class FlattenedTensorMetadata:
    """SGLang's description of one tensor in a flattened bucket (byte offsets when the bucket
    is uint8, element offsets in SGLang's older single-dtype buckets)."""
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def _load(raw: bytes):
    try:
        return safe_pickle.loads(raw, {SGLANG_METADATA: FlattenedTensorMetadata},
                                 buildable=(FlattenedTensorMetadata,))
    except safe_pickle.RefusedName as e:
        hint = ("; the trainer must call torch.multiprocessing.set_sharing_strategy('file_system')"
                if e.name == "rebuild_storage_fd" else "")
        raise PayloadError(f"refused {e.module}.{e.name}: a payload may only name torch's tensor "
                           f"rebuild functions, dtypes and FlattenedTensorMetadata{hint}") from None


def decode(serialized: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from one rank's base64 string; tensors are views of the sender's
    memory, valid while the sender keeps them."""
    try:
        raw = base64.b64decode(serialized, validate=True)
    except binascii.Error as e:
        raise PayloadError(f"not valid base64 ({e})") from None
    try:
        obj = _load(raw)
    except PayloadError:
        raise
    except Exception as e:  # a truncated pickle, a handle to memory that is gone, ...
        raise PayloadError(f"could not unpickle it: {type(e).__name__}: {e}") from None
    return _flattened(obj) if load_format == "flattened_bucket" else _pairs(obj)


def _pairs(obj) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(obj, (list, tuple)):
        raise PayloadError(f"with load_format null the payload is a list of (name, tensor) "
                           f"pairs, got {type(obj).__name__}")
    for i, pair in enumerate(obj):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], torch.Tensor)):
            raise PayloadError(f"item {i} is not a (name, tensor) pair")
    return [(name, tensor) for name, tensor in obj]


def _flattened(obj) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        raise PayloadError("a flattened bucket is a dict with the keys 'flattened_tensor' and "
                           f"'metadata', got {_describe(obj)}")
    flat, metas = obj["flattened_tensor"], obj["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise PayloadError(f"flattened_tensor must be a 1-D tensor, got {_describe(flat)}")
    if not isinstance(metas, list):
        raise PayloadError(f"metadata must be a list, got {_describe(metas)}")
    return [_named_view(flat, meta, i) for i, meta in enumerate(metas)]


def _named_view(flat: torch.Tensor, meta, i: int) -> tuple[str, torch.Tensor]:
    view = _view(flat, meta, i)  # checks the metadata first
    return meta.name, view


def _view(flat: torch.Tensor, meta, i: int) -> torch.Tensor:
    where = f"metadata[{i}]"
    if not _well_formed(meta):
        raise PayloadError(f"{where} is not a FlattenedTensorMetadata with a name, a shape, a "
                           "dtype and non-negative offsets")
    where = f"{where} ({meta.name!r})"
    numel = math.prod(meta.shape)
    as_bytes = flat.dtype == torch.uint8 and meta.dtype != torch.uint8
    want = numel * meta.dtype.itemsize if as_bytes else numel
    if meta.end_idx - meta.start_idx != want or meta.end_idx > flat.numel():
        raise PayloadError(f"{where}: [{meta.start_idx}, {meta.end_idx}) must span {want} "
                           f"{'bytes' if as_bytes else 'elements'} inside the flattened tensor "
                           f"of {flat.numel()}")
    part = flat[meta.start_idx:meta.end_idx]
    if as_bytes:
        if meta.start_idx % meta.dtype.itemsize:  # misaligned for a view: copy it
            part = part.clone()
        part = part.view(meta.dtype)
    return part.view(meta.shape)


def _well_formed(meta) -> bool:
    if not isinstance(meta, FlattenedTensorMetadata):
        return False
    name, shape, dtype = (getattr(meta, f, None) for f in ("name", "shape", "dtype"))
    ints = (*shape, getattr(meta, "start_idx", None), getattr(meta, "end_idx", None)) \
        if isinstance(shape, tuple) else (None,)
    return (isinstance(name, str) and isinstance(dtype, torch.dtype)
            and all(type(v) is int and v >= 0 for v in ints))


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dim()}-D {obj.dtype} tensor"
    return type(obj).__name__
