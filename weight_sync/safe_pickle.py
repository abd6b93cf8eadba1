"""Unpickling tensor handles without running what a peer sends.

A pickle calls whatever names it holds, so a handle (CUDA IPC, torch's file-system sharing) that
arrives over a socket is loaded by an unpickler that resolves only torch's tensor and storage
rebuild functions, torch dtypes, `torch.Size` and the storage classes, plus names a caller adds;
any other name is refused before anything runs. A pickle also sets attributes (its BUILD op)
on whatever object it has made or named, a class included (`torch.UntypedStorage`'s methods,
for every later caller in the process): that is refused too, except on instances of the
classes a caller lists as buildable (a plain metadata record). And only the rebuild functions and
`torch.Size` may be called (a pickle's REDUCE op), only buildable classes instantiated (NEWOBJ):
the other names are values a rebuild function takes (a class, a dtype). Calling `torch.Tensor` on
a nested list of one list repeated builds 2^depth elements from a few hundred bytes.
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


CALLABLE = frozenset(value for (module, _), value in TENSOR_NAMES.items() if module == _R) | {
    torch.Size}


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

    def load_reduce(self):
        _refuse_call(self.stack[-2], CALLABLE)
        super().load_reduce()

    def load_newobj(self):
        _refuse_call(self.stack[-2], self.buildable)
        super().load_newobj()

    def load_newobj_ex(self):
        _refuse_call(self.stack[-3], self.buildable)
        super().load_newobj_ex()

    def _instantiate(self, klass, args):  # the INST and OBJ ops (protocols 0 and 1)
        _refuse_call(klass, self.buildable)
        super()._instantiate(klass, args)

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build,
                pickle.REDUCE[0]: load_reduce, pickle.NEWOBJ[0]: load_newobj,
                pickle.NEWOBJ_EX[0]: load_newobj_ex}

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise RefusedName(module, name)
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: only plain pickles are loaded")


def _refuse_call(target, allowed) -> None:
    if target not in allowed:
        what = getattr(target, "__qualname__", type(target).__name__)
        raise pickle.UnpicklingError(f"refused to call {what}: a pickle may only call torch's "
                                     "rebuild functions and build metadata records")


def loads(raw: bytes, extra: dict | None = None, buildable: tuple[type, ...] = ()):
    """The object in `raw`, resolving only TENSOR_NAMES and `extra` ((module, name) -> value);
    only instances of `buildable` may have their attributes set."""
    return _Unpickler(io.BytesIO(raw), {**TENSOR_NAMES, **(extra or {})}, buildable).load()
