"""The fastest plain torch ops, for `deterministic=False`: results may vary with the batch.

Only the ops where the vendor kernel is faster are swapped: BLAS/cuBLAS linear (its kernel and
its bits depend on the row count) and torch's own reductions. Attention over the paged cache
keeps the split kernel of the deterministic backend: gathering a paged cache into the layout
torch's SDPA wants costs more than the split kernel does (measured by `rollout bench`).
"""

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           splits: tuple[int, ...] | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.to(torch.float32), dim=-1)


def softmax_parts(x: torch.Tensor):
    x = x.to(torch.float32)
    z = x - x.amax(-1, keepdim=True)
    e = torch.exp(z)
    return z, e, e.sum(-1)
