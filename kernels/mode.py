"""Trainer side: run a Hugging Face model through the engine's batch-invariant kernels.

`BatchInvariantMode` intercepts the aten ops whose CPU/CUDA kernels depend on the batch (matmul,
row means, log_softmax) and the one elementwise op whose bits depend on its position (silu), and
computes them with the engine's kernels. Attention goes through `HF_ATTENTION`, registered with
transformers' AttentionInterface. Autograd records the original ops, so backward works (its
results are correct, not batch invariant).
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import DEFAULT_SPLIT_SIZE, backend_module

aten = torch.ops.aten
_active: list["BatchInvariantMode"] = []


def _impl(t: torch.Tensor):
    return backend_module(t.device, _active[-1].backend if _active else "auto")


def _mm(a, b):
    return _impl(a).matmul(a, b)


def _addmm(bias, a, b, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        return NotImplemented
    return _impl(a).matmul(a, b) + bias


def _is_last(dims, ndim: int) -> bool:
    return dims is not None and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def _mean(x, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None or not x.is_floating_point() or not _is_last(dim, x.dim()):
        return NotImplemented
    return _impl(x).mean_last(x, keepdim)


def _silu(x):
    return _impl(x).silu(x)


def _log_softmax(x, dim, half_to_float):
    if not _is_last([dim], x.dim()):
        return NotImplemented
    out = _impl(x).log_softmax(x)
    return out if half_to_float else out.to(x.dtype)


_OVERRIDES = {
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.mean.dim: _mean,
    aten.silu.default: _silu,
    aten._log_softmax.default: _log_softmax,
}


class BatchInvariantMode(TorchDispatchMode):
    def __init__(self, split_size: int = DEFAULT_SPLIT_SIZE, backend: str = "auto"):
        super().__init__()
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        backend_module("cpu", backend)  # validates the name
        self.split_size, self.backend = split_size, backend

    def __enter__(self):
        _active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active.pop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        override = _OVERRIDES.get(func)
        if override is not None:
            out = override(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


def hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [B, H, L, D], key/value [B, kv_heads, L, D].

    Sequences must be right-padded (causal attention never looks at the padding after a token).
    Returns [B, L, H, D] as the interface expects."""
    if dropout:
        raise ValueError(f"{__name__}.hf_attention does not do dropout (got dropout={dropout})")
    split = _active[-1].split_size if _active else DEFAULT_SPLIT_SIZE
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    impl = _impl(query)
    outs = [impl.causal_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                  scale, split)
            for q, k, v in zip(query, key, value)]
    return torch.stack(outs), None


def register_hf_attention(name: str) -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(name, hf_attention)
