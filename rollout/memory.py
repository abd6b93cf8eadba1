"""Device memory the engine can give back and take again (weights, KV cache).

One small interface, `Arena`, with two implementations:
- `FlatArena` (the CPU, and CUDA without torch_memory_saver): the tensors are views of one flat
  buffer. Release drops the buffer, so the allocator really returns it (on the CPU one mapping is
  unmapped, then the C heap is trimmed); a backup goes to pinned host memory on CUDA and to an
  unlinked temporary file on the CPU, where host memory is what is being given back. Resume
  allocates a new buffer and re-points the same tensor objects into it.
- `SaverArena` (CUDA with torch_memory_saver installed): the buffer lives in a memory-saver region,
  so release and resume keep its virtual addresses.
"""

import ctypes
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch


# glibc gives a large freed block straight back to the OS (a block over its mmap threshold, 128
# kB rising to 32 MB, is its own mapping; a free heap top past 128 kB is trimmed), so each
# step's large temporaries (logits, activations, gathered K/V) were page-faulted in again:
# ~600,000 faults per `rollout bench` run, a sampling step 3x slower than its arithmetic.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
KEPT_BLOCK_BYTES = 256 << 20  # larger blocks (weights, KV cache) stay mappings of their own
KEPT_FREE_BYTES = 1 << 30  # freed heap memory kept for reuse, up to this much


def keep_freed_host_memory() -> bool:
    """Have glibc keep freed blocks under KEPT_BLOCK_BYTES for reuse (process-wide: the engine's
    CPU steps reuse the same temporaries). `trim_host_memory()` still gives them back, as an
    arena release does. Returns whether glibc took the settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


def trim_host_memory() -> None:
    """Return freed C-heap pages to the OS (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """This process's resident set size, from the OS."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bytes_in_use(device: torch.device | str) -> int:
    """Memory in use where the engine keeps its tensors: this process's resident set for the CPU,
    the GPU's used memory as its driver reports it for CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    return resident_bytes()


class Arena(ABC):
    """A flat device buffer that views are carved from. `bind(buffer)` is called with each new
    buffer so its owner re-points its tensors (the same Python objects) into it."""

    def __init__(self, tag: str, numel: int, dtype: torch.dtype, device: torch.device,
                 bind: Callable[[torch.Tensor], None]):
        self.tag, self.numel, self.dtype, self.device, self.bind = tag, numel, dtype, device, bind
        self.resident = True

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @abstractmethod
    def allocate(self) -> None: ...

    @abstractmethod
    def release(self, backup: bool) -> None:
        """Give the memory back; returns when it is freed. `backup` keeps the contents."""

    @abstractmethod
    def resume(self) -> bool:
        """Take the memory again; returns whether the old contents are back."""


class FlatArena(Arena):
    def __init__(self, *args, zero: bool = False):
        super().__init__(*args)
        self.zero = zero
        self.buffer: torch.Tensor | None = None
        self._backup = None

    def allocate(self) -> None:
        make = torch.zeros if self.zero else torch.empty
        self.buffer = make(self.numel, dtype=self.dtype, device=self.device)
        self.bind(self.buffer)
        self.resident = True

    def release(self, backup: bool) -> None:
        if not self.resident:
            return
        if backup:
            self._backup = self._save(self.buffer)
        self.bind(torch.empty(0, dtype=self.dtype, device=self.device))
        self.buffer = None
        self.resident = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        else:
            trim_host_memory()

    def resume(self) -> bool:
        if self.resident:
            return True
        self.allocate()
        backup, self._backup = self._backup, None
        if backup is None:
            return False
        self._restore(backup, self.buffer)
        return True

    def _save(self, buffer: torch.Tensor):
        if buffer.is_cuda:
            host = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=True)
            host.copy_(buffer)
            return host
        f = tempfile.TemporaryFile()
        f.write(memoryview(buffer.view(torch.uint8).numpy()))
        f.flush()
        return f

    def _restore(self, backup, buffer: torch.Tensor) -> None:
        if isinstance(backup, torch.Tensor):
            buffer.copy_(backup)
            return
        with backup:
            backup.seek(0)
            backup.readinto(memoryview(buffer.view(torch.uint8).numpy()))


class SaverArena(Arena):
    """torch_memory_saver keeps virtual addresses, so views stay valid across release."""

    def __init__(self, *args, zero: bool = False):
        super().__init__(*args)
        import torch_memory_saver
        self.saver = getattr(torch_memory_saver, "torch_memory_saver", torch_memory_saver)
        self.zero = zero
        self.buffer: torch.Tensor | None = None
        self._backed_up = False

    def allocate(self) -> None:
        with self.saver.region(tag=self.tag, enable_cpu_backup=not self.zero):
            self.buffer = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.bind(self.buffer)
        self.resident = True

    def release(self, backup: bool) -> None:
        if self.resident:
            self.saver.pause(self.tag)
            torch.cuda.synchronize(self.device)
            self.resident, self._backed_up = False, backup and not self.zero

    def resume(self) -> bool:
        if self.resident:
            return True
        self.saver.resume(self.tag)
        self.resident = True
        if self.zero:
            self.buffer.zero_()
        return self._backed_up


def make_arena(tag: str, numel: int, dtype: torch.dtype, device: torch.device,
               bind: Callable[[torch.Tensor], None], zero: bool = False) -> Arena:
    """The arena for this device: SaverArena on CUDA when torch_memory_saver imports."""
    kind = FlatArena
    if device.type == "cuda":
        try:
            import torch_memory_saver  # noqa: F401
            kind = SaverArena
        except ImportError:
            pass
    arena = kind(tag, numel, dtype, device, bind, zero=zero)
    arena.allocate()
    return arena
