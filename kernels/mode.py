"""Trainer side: run a Hugging Face model through the engine's batch-invariant kernels.

`BatchInvariantMode` intercepts the aten ops whose CPU/CUDA kernels depend on the batch (matmul,
row means, log_softmax) and the one elementwise op whose bits depend on its position (silu), and
computes them with the engine's kernels. Attention goes through `HF_ATTENTION`, registered with
transformers' AttentionInterface. Autograd records the original ops, so backward works (its
results are correct, not batch invariant).
"""

import weakref
from collections.abc import Mapping

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


def _expected(expect) -> dict:
    """device, block_size and CPU threads of an engine's determinism report (or of a mapping of
    them: a server's /server_info gives device, page_size and threads)."""
    if expect is None:
        return {}
    if isinstance(expect, Mapping):
        return {"device": expect.get("device"),
                "block_size": expect.get("block_size", expect.get("page_size")),
                "threads": expect.get("threads")}
    return {"device": expect.device, "block_size": expect.block_size, "threads": expect.threads}


class BatchInvariantMode(TorchDispatchMode):
    """`expect`: the engine's `determinism_report()` (or a mapping with its device, block_size
    and threads): the conditions under which the rollout's bits are reproduced are checked
    instead of assumed (split_size defaults to its block size; a CPU thread count other than
    the engine's is refused on entering)."""

    def __init__(self, split_size: int | None = None, backend: str = "auto", expect=None):
        super().__init__()
        self.expected = _expected(expect)
        block_size = self.expected.get("block_size")
        if split_size is None:
            split_size = block_size or DEFAULT_SPLIT_SIZE
        elif block_size is not None and split_size != block_size:
            raise ValueError(f"split_size {split_size} differs from the engine's block size "
                             f"{block_size}: attention would sum its keys in other splits")
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        backend_module("cpu", backend)  # validates the name
        self.split_size, self.backend = split_size, backend
        self.positions_checked = lambda: None  # weak reference to the last position_ids checked

    def __enter__(self):
        threads = self.expected.get("threads")
        device = str(self.expected.get("device") or "")
        if threads is not None and device.startswith("cpu") \
                and threads != torch.get_num_threads():
            raise RuntimeError(f"the engine ran on {threads} torch threads, this process on "
                               f"{torch.get_num_threads()}: on the CPU BLAS picks its kernels "
                               f"by thread count, so the log-probs would differ; call "
                               f"torch.set_num_threads({threads}) first")
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

    Sequences must be right-padded, one per row (causal attention never looks at the padding
    after a token); left padding and packed rows are refused (`_right_padding_only`,
    `_check_positions`). Returns [B, L, H, D] as the interface expects."""
    if dropout:
        raise ValueError(f"{__name__}.hf_attention does not do dropout (got dropout={dropout})")
    mode = _active[-1] if _active else None
    positions = kwargs.get("position_ids")
    if mode is None or mode.positions_checked() is not positions:  # every layer gets the same
        _check_positions(positions)
        if mode is not None and positions is not None:
            mode.positions_checked = weakref.ref(positions)
    split = mode.split_size if mode is not None else DEFAULT_SPLIT_SIZE
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    impl = _impl(query)
    outs = [impl.causal_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                  scale, split)
            for q, k, v in zip(query, key, value)]
    return torch.stack(outs), None


def _right_padding_only(attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """transformers' mask hook for our attention name: builds no [B, 1, L, L] mask (the
    attention is causal over each row's first tokens) and refuses a 2D padding mask with
    padding before tokens (left padding), which would be attended as if right-padded."""
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask.bool()
        if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
            raise ValueError(NOT_RIGHT_PADDED)
    return None


def _check_positions(position_ids: torch.Tensor | None) -> None:
    """Each row's positions count 0, 1, ... over its tokens; the padding after them may hold
    anything that does not count up again (a second sequence packed in the row would)."""
    if position_ids is None:
        return
    step = position_ids[:, 1:] - position_ids[:, :-1]
    fell = (step < 0).cumsum(-1) > 0
    if bool((position_ids[:, 0] != 0).any() or (fell & (step > 0)).any()):
        raise ValueError(NOT_RIGHT_PADDED)


NOT_RIGHT_PADDED = ("batch_invariant_mode's attention takes right-padded batches (each row: one "
                    "sequence's tokens from position 0, then padding); this batch has padding "
                    "before tokens or several sequences in a row: pad on the right")


def register_hf_attention(name: str) -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(name, hf_attention)
    try:  # transformers' mask hook for this name: checks the padding, builds no mask
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return
    AttentionMaskInterface.register(name, _right_padding_only)
