"""Op sequences shared by both backends, written once. Each takes the backend's row reduction;
everything else is elementwise torch, whose bits do not depend on the batch. The sequences are
those transformers runs, so the trainer-side mode (which swaps only the reductions) matches."""

from collections.abc import Callable

import torch

RowSum = Callable[[torch.Tensor], torch.Tensor]


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in a fixed pairwise order, from elementwise adds alone:
    halving over the width padded with zeros to a power of two (the padding is never
    materialized: adding 0 is exact)."""
    n = x.shape[-1]
    if n == 1:
        return x[..., 0]
    half = 1 << (n - 1).bit_length() - 1
    if n == 2 * half:
        y = x[..., :half] + x[..., half:]
    else:
        y = x[..., :half].clone()
        y[..., :n - half] += x[..., half:]
    while half > 1:
        half //= 2
        y = y[..., :half] + y[..., half:]
    return y[..., 0]


def mean_last(row_sum: RowSum, x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    out = (row_sum(x) / x.shape[-1]).to(x.dtype)
    return out.unsqueeze(-1) if keepdim else out


def rms_norm(row_sum: RowSum, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face RMSNorm of Llama/Qwen, step for step."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(mean_last(row_sum, xf.pow(2), keepdim=True) + eps)
    return weight * xf.to(dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """From exp, whose vectorized and scalar CPU paths agree (torch's silu kernel's do not)."""
    return x / torch.neg(x).exp_().add_(1)  # in place on a temporary: the same bits, one buffer


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return silu(gate).mul_(up)


def softmax_parts(row_sum: RowSum, x: torch.Tensor):
    """z = x - max, e = exp(z), s = sum(e) over the last dimension, in float32. log_softmax is
    z - log(s); a sampler draws from e and prices one token without the full log_softmax."""
    x = x.to(torch.float32)
    z = x - x.amax(-1, keepdim=True)
    e = torch.exp(z)
    return z, e, row_sum(e)


def log_softmax(row_sum: RowSum, x: torch.Tensor) -> torch.Tensor:
    z, _, s = softmax_parts(row_sum, x)
    return z - torch.log(s).unsqueeze(-1)
