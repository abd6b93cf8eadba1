"""The fastest plain torch ops, for `deterministic=False`: results may vary with the batch.

Only the ops where the vendor kernel is faster are swapped: the vendor linear, fused weights in
one call (cuBLAS; oneDNN on the CPU, faster there than torch's MKL path; its kernel and its bits
depend on the row count) and torch's own reductions. Attention over the paged cache
keeps the split kernel of the deterministic backend: gathering a paged cache into the layout
torch's SDPA wants costs more than the split kernel does (measured by `rollout bench`).
"""

from functools import partial

import torch
import torch.nn.functional as F

from kernels import composite, invariance


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           splits: tuple[int, ...] | None = None) -> torch.Tensor | list[torch.Tensor]:
    """A fused weight (`splits`) runs as one product; its parts come back as views."""
    if x.device.type == "cpu" and torch.backends.mkldnn.is_available() and x.dtype in (
            torch.float32, torch.bfloat16):
        out = torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    else:
        out = F.linear(x, w, bias)
    return out if splits is None else list(out.split(splits, dim=-1))


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1)


rms_norm = partial(composite.rms_norm, _row_sum)
rotate = composite.rotate
softmax_parts = partial(composite.softmax_parts, _row_sum)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.to(torch.float32), dim=-1)


def prepare(invariant, linears, row_lengths, head_dim: int, split: int,
            dtype: torch.dtype) -> list[invariance.Verdict]:
    """What runs: vendor linears and reductions (no guarantee), and the invariant backend's
    attention, prepared by it."""
    verdicts = [invariance.record("linear", f"K={w.shape[1]} N={w.shape[0]}", dtype,
                                  "vendor BLAS (deterministic=False): batch dependent", False)
                for w, _ in linears]
    verdicts += [invariance.record("row_sum", f"n={n}", torch.float32,
                                   "torch reduction (deterministic=False): batch dependent",
                                   False) for n in row_lengths]
    return list(dict.fromkeys(verdicts + invariant.prepare([], [], head_dim, split, dtype)))
