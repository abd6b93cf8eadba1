"""Op sequences shared by both backends, written once. Each takes the backend's row reduction;
everything else is elementwise torch, whose bits do not depend on the batch. The sequences are
those transformers runs, so the trainer-side mode (which swaps only the reductions) matches."""

from collections.abc import Callable
from itertools import accumulate

import torch

RowSum = Callable[[torch.Tensor], torch.Tensor]
MatMul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # x [M, K] @ w_t [K, N]


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


def weight_parts(w: torch.Tensor, splits: tuple[int, ...]) -> list[torch.Tensor]:
    """The parts of a fused weight (or bias) along its first dimension, as views."""
    bounds = [0, *accumulate(splits)]
    return [w[a:b] for a, b in zip(bounds, bounds[1:])]


def linear(matmul: MatMul, x: torch.Tensor, w: torch.Tensor,
           bias: torch.Tensor | None = None,
           splits: tuple[int, ...] | None = None) -> torch.Tensor | list[torch.Tensor]:
    """F.linear on the backend's matmul. `splits` names the parts of a fused weight (q/k/v,
    gate/up): each part is its own product, the very call a trainer's separate projection makes
    (a product's bits can depend on its column count), and comes back as its own tensor."""
    x2 = x.reshape(-1, x.shape[-1])
    if splits is None:
        return _biased(matmul(x2, w.t()), bias).reshape(*x.shape[:-1], w.shape[0])
    biases = weight_parts(bias, splits) if bias is not None else [None] * len(splits)
    return [_biased(matmul(x2, part.t()), b).reshape(*x.shape[:-1], part.shape[0])
            for part, b in zip(weight_parts(w, splits), biases)]


def _biased(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


def mean_last(row_sum: RowSum, x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    out = (row_sum(x) / x.shape[-1]).to(x.dtype)
    return out.unsqueeze(-1) if keepdim else out


def rms_norm(row_sum: RowSum, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face RMSNorm of Llama/Qwen, step for step."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(mean_last(row_sum, xf.pow(2), keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x * cos + rotate_half(x) * sin, as transformers computes it, without
    building rotate_half(x): its first half is -x2, and a + (-x2 * s) is exactly a - x2 * s.
    x [T, H, D]; cos, sin [T, 1, D]."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


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
