"""What the engine can promise about determinism on this machine, and why: one row per op
shape with the implementation chosen at start (see `kernels.invariance`)."""

import os
import platform
import re
from dataclasses import dataclass

import torch

from kernels.invariance import Verdict

BLAS_ENV = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
            "OPENBLAS_CORETYPE")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")


def blas() -> str:
    """The BLAS torch runs on the CPU, and the environment variables that steer it."""
    config = torch.__config__.show()
    found = re.search(r"(Math Kernel Library|oneMKL)[^\n]*?Version ([\d.]+)", config)
    name = f"MKL {found.group(2)}" if found else ("MKL" if torch.backends.mkl.is_available()
                                                  else "torch's BLAS")
    if torch.backends.mkldnn.is_available():
        name += " + oneDNN"
    env = [f"{k}={os.environ[k]}" for k in BLAS_ENV if k in os.environ]
    return name + (f" ({', '.join(env)})" if env else "")


@dataclass(frozen=True)
class DeterminismReport:
    machine: str
    blas: str
    device: str
    dtype: str
    deterministic: bool
    kernel_backend: str
    block_size: int
    verdicts: tuple[Verdict, ...]

    @property
    def threads(self) -> int:
        """The torch thread count the CPU kernels were proven and chosen for."""
        return self.verdicts[0].threads if self.verdicts else torch.get_num_threads()

    @property
    def guaranteed(self) -> bool:
        """Batch invariance holds for every op this engine runs, on this machine."""
        return self.deterministic and all(v.guaranteed for v in self.verdicts)

    def format(self) -> str:
        lines = [f"machine: {self.machine}", f"BLAS: {self.blas}",
                 f"engine: device={self.device} dtype={self.dtype} "
                 f"deterministic={self.deterministic} kernel_backend={self.kernel_backend} "
                 f"block_size={self.block_size}", ""]
        header = ("op", "shape", "dtype", "threads", "implementation", "invariant")
        rows = [header] + [(v.op, v.shape, v.dtype, str(v.threads), v.method,
                            "yes" if v.guaranteed else "NO") for v in self.verdicts]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("")
        if self.guaranteed:
            lines.append("batch invariance: GUARANTEED on this machine for every op above "
                         "(same device type, dtype, block size and thread count)")
        else:
            bad = sorted({v.op for v in self.verdicts if not v.guaranteed})
            why = ("deterministic=False" if not self.deterministic
                   else f"no guarantee for {', '.join(bad)}")
            lines.append(f"batch invariance: NOT GUARANTEED ({why}); outputs may depend on "
                         "what else is in the batch")
        return "\n".join(lines)
