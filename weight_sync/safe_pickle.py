"""Unpickling tensor handles without running what a peer sends.

A pickle calls whatever names it holds, so a handle (CUDA IPC, torch's file-system sharing) that
arrives over a socket is loaded by an unpickler that resolves only torch's tensor and storage
rebuild functions, torch dtypes, `torch.Size` and the storage classes, plus names a caller adds;
any other name is refused before anything runs. A pickle also sets attributes (its BUILD op)
on whatever object it has made or named, a class included (`torch.UntypedStorage`'s methods,
for every later caller in the process): that is refused too, except on instances of the
classes a caller lists as buildable (a plain metadata record).
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


class _Unpickler(pickle._Unpickler):  # the Python one: its BUILD can be checked (handles are
    # small, its speed does not matter)
    def __init__(self, file, allowed: dict, buildable: tuple[type, ...]):
        super().__init__(file)
        self.allowed, self.buildable = allowed, buildable

    def load_build(self):
        target = self.stack[-2]
        if type(target) not in self.buildable:
            what = target.__name__ if isinstance(target, type) else type(target).__name__
            raise pickle.UnpicklingError(f"refused to set attributes of {what}: only "
                                         "metadata records may be built")
        super().load_build()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise RefusedName(module, name)
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: only plain pickles are loaded")


def loads(raw: bytes, extra: dict | None = None, buildable: tuple[type, ...] = ()):
    """The object in `raw`, resolving only TENSOR_NAMES and `extra` ((module, name) -> value);
    only instances of `buildable` may have their attributes set."""
    return _Unpickler(io.BytesIO(raw), {**TENSOR_NAMES, **(extra or {})}, buildable).load()
