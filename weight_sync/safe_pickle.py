"""Unpickling tensor handles without running what a peer sends.

A pickle calls whatever names it holds, so a handle (CUDA IPC, torch's file-system sharing) that
arrives over a socket is loaded by an unpickler that resolves only torch's tensor and storage
rebuild functions, torch dtypes, `torch.Size` and the storage classes, plus names a caller adds;
any other name is refused before anything runs.
"""

import io
import pickle

import torch
from torch.multiprocessing import reductions

_R = "torch.multiprocessing.reductions"
TENSOR_NAMES = {
    (_R, "rebuild_tensor"): reductions.rebuild_tensor,
    (_R, "rebuild_cuda_tensor"): reductions.rebuild_cuda_tensor,
    (_R, "rebuild_typed_storage"): reductions.rebuild_typed_storage,
    (_R, "rebuild_storage_filename"): reductions.rebuild_storage_filename,
    (_R, "rebuild_storage_empty"): reductions.rebuild_storage_empty,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "UntypedStorage"): torch.UntypedStorage,
    ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
    ("torch.storage", "TypedStorage"): torch.TypedStorage,
    **{("torch", name): value for name, value in vars(torch).items()
       if isinstance(value, torch.dtype)},
}


class RefusedName(pickle.UnpicklingError):
    """The pickle names something outside the allowed set; nothing it names has run."""

    def __init__(self, module: str, name: str):
        super().__init__(f"refused {module}.{name}: only torch's tensor rebuild functions, "
                         f"dtypes and storage classes may be named")
        self.module, self.name = module, name


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise RefusedName(module, name)
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: only plain pickles are loaded")


def loads(raw: bytes, extra: dict | None = None):
    """The object in `raw`, resolving only TENSOR_NAMES and `extra` ((module, name) -> value)."""
    return _Unpickler(io.BytesIO(raw), {**TENSOR_NAMES, **(extra or {})}).load()
