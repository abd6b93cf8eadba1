import hashlib
from collections.abc import Iterable

import torch

from weight_sync.buckets import dtype_name


def checksum(named_tensors: Iterable[tuple[str, torch.Tensor]],
             dtype: torch.dtype | None = None) -> str:
    """A digest of names, dtypes, shapes and bytes, in name order. With `dtype`, tensors are
    converted first: a float32 trainer passes the engine's dtype to compare with
    `engine.weights_checksum()`."""
    h = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        t = tensor.detach()
        if dtype is not None:
            t = t.to(dtype)
        t = t.contiguous().cpu()
        h.update(f"{name}|{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
