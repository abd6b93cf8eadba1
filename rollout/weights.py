"""Versioned, transactional, in-place weight updates (engine side).

Every transport ends here. A transaction validates its whole manifest before the first byte
lands, copies each tensor into the rows of the parameter it belongs to (so no `data_ptr()`
changes), and commits a new version. A transaction that breaks leaves the weights marked
incomplete, naming the version, until an update covering every half-written tensor commits.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Integral

import torch

from kernels import forget_packed_weights
from rollout.models import WeightTarget
from weight_sync.buckets import TensorMeta, dtype_from_name


Version = int | str  # SGLang and slime name versions with strings


class IncompleteWeightsError(RuntimeError):
    """Generation refused: the weights are a mix of two versions."""


@dataclass
class _Transaction:
    version: Version
    metas: dict[str, TensorMeta]  # the manifest, checked: every tensor loaded must match it
    loaded: set[str] = field(default_factory=set)
    written: dict[str, str] = field(default_factory=dict)  # tensor -> the name that wrote it


@dataclass
class Incomplete:
    """Why the weights cannot be used, and which tensors an update must rewrite to fix it."""
    dirty: set[str]
    message: str


class WeightStore:
    def __init__(self, targets: dict[str, WeightTarget], tied: bool):
        self.targets = targets
        self.tied = tied
        # names a trainer's named_parameters() holds (a tied lm_head is the embedding itself)
        self.canonical = sorted(n for n in targets if not (tied and n == "lm_head.weight"))
        self.version: Version = 0
        self.txn: _Transaction | None = None
        self.broken: Incomplete | None = None

    def validate(self, manifest: list[TensorMeta]) -> None:
        problems, seen = [], set()
        for m in manifest:
            target = self.targets.get(m.name)
            if m.name in seen:
                problems.append(f"{m.name}: listed twice")
            elif target is None:
                problems.append(f"{m.name}: not a parameter of this model")
            elif tuple(m.shape) != target.shape:
                problems.append(f"{m.name}: shape {tuple(m.shape)}, the model has "
                                f"{target.shape}")
            else:
                try:
                    floating = dtype_from_name(m.dtype).is_floating_point
                except ValueError:
                    floating = False
                if not floating:
                    problems.append(f"{m.name}: dtype {m.dtype} is not a floating-point type")
            seen.add(m.name)
        if self.broken is not None:
            missing = sorted(self.broken.dirty - {self._tensor(n) for n in seen})
            if missing:
                problems.append(f"{len(missing)} tensors are not usable ({self.broken.message}) "
                                f"and this update does not rewrite them: {missing[:8]}"
                                f"{' ...' if len(missing) > 8 else ''}")
        if problems:
            raise ValueError(f"weight update refused, weights untouched; {len(problems)} "
                             "problem(s):\n  " + "\n  ".join(problems))

    def check_begin(self, version: Version | None, manifest: list[TensorMeta]) -> Version:
        """Whether an update may begin (no other open, a valid version and manifest): the
        version it would commit, or an error; changes nothing."""
        if self.txn is not None:
            raise RuntimeError(f"an update to version {self.txn.version} is already open")
        version = self._next_version(version)
        self.validate(manifest)
        return version

    def begin(self, version: Version | None, manifest: list[TensorMeta]) -> None:
        version = self.check_begin(version, manifest)
        self.txn = _Transaction(version, {m.name: m for m in manifest})

    def _tensor(self, name: str) -> str:
        """The canonical name of the tensor `name` writes (a tied lm_head: the embedding)."""
        return "model.embed_tokens.weight" if self.tied and name == "lm_head.weight" else name

    def _next_version(self, version: Version | None) -> Version:
        """The given version (an int or a non-empty string), else the current one plus 1."""
        if version is None:
            if isinstance(self.version, str):
                raise ValueError(f"the weights are at version {self.version!r}, a string: give the "
                                 "update its version (no number follows a string)")
            return self.version + 1
        if isinstance(version, Integral) and not isinstance(version, bool):
            return int(version)
        if isinstance(version, str) and version:
            return version
        raise ValueError(f"weight version {version!r} must be an int or a non-empty string")

    def relabel(self, version: Version) -> None:
        """Name the current weights `version` without changing them."""
        if self.txn is not None:
            raise RuntimeError(f"an update to version {self.txn.version} is open; relabel after "
                               "it commits")
        self.version = self._next_version(version)

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        txn = self.txn
        if txn is None:
            raise RuntimeError("load outside an update: begin one first")
        forget_packed_weights()  # copies of the old bytes
        for name, tensor in named_tensors:
            meta = txn.metas.get(name)
            if meta is None:
                raise ValueError(f"{name!r} is not in this update's manifest")
            if (tensor.dtype, tuple(tensor.shape)) != (dtype_from_name(meta.dtype), meta.shape):
                raise ValueError(f"{name}: {tensor.dtype} {list(tensor.shape)} arrived, the "
                                 f"manifest said {meta.dtype} {list(meta.shape)}")
            self._write(txn, name, tensor)
            txn.loaded.add(name)

    def _write(self, txn: _Transaction, name: str, tensor: torch.Tensor) -> None:
        view, tensor_name = self.targets[name].view(), self._tensor(name)
        first = txn.written.setdefault(tensor_name, name)
        if first == name:
            view.copy_(tensor, non_blocking=True)
        elif not torch.equal(_bits(view), _bits(tensor.to(view.device, view.dtype))):
            raise ValueError(f"{name} and {first} are one tensor in this model (tied "
                             f"embeddings), and the update gives them different values")

    def commit(self) -> Version:
        txn = self.txn
        if txn is None:
            raise RuntimeError("commit outside an update")
        missing = sorted(set(txn.metas) - txn.loaded)
        if missing:
            self.abort(f"commit with {len(missing)} tensors of the manifest never sent")
            raise ValueError(f"update to version {txn.version} is incomplete: "
                             f"{len(missing)} tensors never arrived: {missing[:8]}")
        if self.targets and next(iter(self.targets.values())).param.is_cuda:
            torch.cuda.synchronize()
        self.txn, self.broken = None, None
        self.version = txn.version
        return self.version

    def abort(self, reason: str) -> None:
        """The transfer broke: whatever landed is now a mix of versions."""
        txn, self.txn = self.txn, None
        if txn is None or not txn.loaded:
            return  # nothing was written: the weights are still the last version
        dirty = ({self._tensor(n) for n in txn.loaded}
                 | (self.broken.dirty if self.broken else set()))
        self.broken = Incomplete(dirty, f"the update to version {txn.version} broke ({reason}) "
                                        f"after writing {len(txn.loaded)} tensors")

    def mark_discarded(self) -> None:
        self.broken = Incomplete(set(self.canonical), "weights were discarded by "
                                 "release_memory(weights='discard') and no update has replaced "
                                 "them yet")

    def check_complete(self) -> None:
        if self.broken is not None:
            raise IncompleteWeightsError(
                f"weights are incomplete: {self.broken.message}; generation resumes after an "
                f"update that rewrites them (the last complete version was {self.version})")

    def load_checkpoint(self, path) -> None:
        """The first load: every tensor the model needs, as version 0, through the same
        transaction as any update."""
        from rollout.loader import checkpoint_manifest, iter_checkpoint
        manifest = checkpoint_manifest(path)
        missing = sorted(set(self.canonical) - {self._tensor(m.name) for m in manifest})
        if missing:
            raise ValueError(f"checkpoint {str(path)!r} lacks {len(missing)} tensors the model "
                             f"needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        self.begin(0, manifest)
        self.load(iter_checkpoint(path))
        self.commit()

    def checksum(self) -> str:
        from weight_sync.digest import checksum
        return checksum((n, self.targets[n].view()) for n in self.canonical)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: equal bits compare equal (NaN too)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
