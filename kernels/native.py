"""The CPU kernels of `native.c` (attention, row sums, RMSNorm, rotary embedding, KV-cache
store, and bfloat16 linears on AMX tiles where the CPU has them), built with the machine's C
compiler on first use and loaded with ctypes.

Built once per source, compiler and CPU (-march=native), into ROLLOUT_KERNEL_CACHE (default
~/.cache/rollout/kernels). Where no compiler is found or the build fails, `library()` is None
and the CPU backend runs torch ops instead (batch invariant too, slower); every path of one
process (decode, prefill, a trainer's scoring) takes the same one, so their bits agree.
ROLLOUT_CPU_KERNELS=torch chooses the torch ops; ROLLOUT_CPU_AMX=0 keeps bfloat16 linears off
the AMX kernel (oneDNN's proven row tiles instead: other bits, see kernels/cpu.py).
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).with_name("native.c")
# -ffp-contract=off: the compiler fuses no multiply and add on its own (the code's fmaf calls
# are its only fused ones), so every float op rounds as written and vector and scalar code give
# the same bits; never -ffast-math (-fno-math-errno: sqrt stays one instruction, correctly
# rounded, with no libm call for errno)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno",
         "-fPIC", "-shared", "-std=c11")
LIBS = ("-lm",)  # fmaf, where the CPU has no fused multiply-add instruction
# threads from the process's OpenMP runtime (torch's: the .so finds the libgomp already loaded);
# a compiler without OpenMP builds a one-thread kernel, with the same bits
THREADS = ("-fopenmp",)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "".join(lines)


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "rollout" / "kernels"
    return Path(os.environ.get("ROLLOUT_KERNEL_CACHE", default))


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, version, _cpu_key(),
                                    " ".join(FLAGS + LIBS)]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for threads in (THREADS, ()):
            done = subprocess.run([cc, *FLAGS, *threads, str(SOURCE), *LIBS, "-o", str(built)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {done.stderr[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders each install a whole file
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (torch ops run instead; see the module doc)."""
    choice = os.environ.get("ROLLOUT_CPU_KERNELS", "native")
    if choice not in ("native", "torch"):
        raise ValueError(f"ROLLOUT_CPU_KERNELS={choice!r}: choose 'native' or 'torch'")
    cc = _compiler()
    if choice == "torch" or cc is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"CPU kernels not built ({err}); running torch ops instead")
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.attend.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int, i64, i64, i64, i64,
                           i64, ptr, i64]
    lib.attend.restype = ctypes.c_int
    lib.row_sum.argtypes = [ptr, i64, i64, ptr, i64]
    lib.row_sum.restype = None
    lib.store.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64]
    lib.store.restype = None
    lib.rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_double, ctypes.c_int, i64]
    lib.rms_norm.restype = ctypes.c_int
    lib.rotate.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, i64]
    lib.rotate.restype = None
    lib.hardware_fma.restype = ctypes.c_int
    lib.amx_ready.restype = ctypes.c_int
    lib.amx_pack.argtypes = [ptr, i64, i64, i64, i64, ptr, i64]
    lib.amx_pack.restype = None
    lib.amx_linear.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, i64, i64]
    lib.amx_linear.restype = ctypes.c_int
    if not lib.hardware_fma():
        warnings.warn("this CPU has no fused multiply-add instruction: the CPU attention kernel "
                      "runs libm's fmaf (the same bits, tens of times slower)")
    return lib


@cache
def amx() -> ctypes.CDLL | None:
    """The built kernels where their bfloat16 AMX linear runs here (a build for a CPU with AMX
    tiles, which this process may use), else None."""
    choice = os.environ.get("ROLLOUT_CPU_AMX", "1")
    if choice not in ("0", "1"):
        raise ValueError(f"ROLLOUT_CPU_AMX={choice!r}: choose 1 (default) or 0")
    lib = library()
    return lib if lib is not None and choice == "1" and lib.amx_ready() else None
