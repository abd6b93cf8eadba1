"""Batch-invariant ops for the rollout engine, and the trainer-side `batch_invariant_mode()`.

`get_ops(device, deterministic)` returns the forward's ops: torch implementations on the CPU,
Triton kernels on CUDA when deterministic, plain torch (fastest, batch dependent) otherwise.
Nothing here imports the engine.
"""

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch

DEFAULT_SPLIT_SIZE = 32
_HF_ATTENTION_NAME = "rollout_batch_invariant"


@dataclass(frozen=True)
class Ops:
    linear: Callable
    rms_norm: Callable
    silu_and_mul: Callable
    log_softmax: Callable
    softmax_parts: Callable
    store_kv: Callable
    rotate: Callable  # rotary embedding: rotate(x [T, H, D], cos, sin [T, 1, D])
    decode_attention: Callable
    prefill_attention: Callable
    # prepare(linears [(weight, splits)], row_lengths, head_dim, split, dtype): decides (and
    # proves, where the backend calls BLAS) every shape before the first step; see `report()`
    prepare: Callable


def _ops_from(module) -> Ops:
    return Ops(module.linear, module.rms_norm, module.silu_and_mul, module.log_softmax,
               module.softmax_parts, module.store_kv, module.rotate, module.decode_attention,
               module.prefill_attention, module.prepare)


BACKENDS = ("auto", "torch", "triton")


def backend_module(device: torch.device | str, backend: str = "auto"):
    """The batch-invariant implementation: Triton on CUDA, torch on the CPU ('auto'). Naming
    'triton' on the CPU runs the Triton kernels through the interpreter (TRITON_INTERPRET=1)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda"):
        from kernels import triton_ops
        return triton_ops
    from kernels import cpu
    return cpu


def get_ops(device: torch.device | str, deterministic: bool = True,
            backend: str = "auto", packed_weights: bool = True) -> Ops:
    """`packed_weights=False`: the CPU backend's linears call the plain weights (no packed
    copies: half the host memory for weights, slower at few rows; the same bits)."""
    invariant = backend_module(device, backend)
    if deterministic:
        ops = _ops_from(invariant)
        plain = getattr(invariant, "plain_linear", None)
        return ops if packed_weights or plain is None else replace(ops, linear=plain)
    from kernels import fast
    return Ops(fast.linear, fast.rms_norm, fast.silu_and_mul, fast.log_softmax,
               fast.softmax_parts, invariant.store_kv, fast.rotate, invariant.decode_attention,
               invariant.prefill_attention, partial(fast.prepare, invariant))


def batch_invariant_mode(split_size: int | None = None, backend: str = "auto", expect=None):
    """Context manager for the trainer: torch ops run through the same batch-invariant kernels
    as the engine, so a Hugging Face model computes the rollout's log-probs bitwise.
    `expect`: the engine's `determinism_report()` (or a server's /server_info): its block size
    becomes the split size, and a CPU thread count other than the engine's is refused.
    split_size defaults to that block size, else DEFAULT_SPLIT_SIZE."""
    from kernels.mode import BatchInvariantMode
    return BatchInvariantMode(split_size, backend, expect)


def forget_packed_weights() -> None:
    """Weights were written or rebound: the CPU backend drops its packed copies of them (made
    again on their next use). The engine calls this; anyone writing its weights another way
    must too."""
    import sys
    cpu = sys.modules.get("kernels.cpu")
    if cpu is not None:
        cpu.forget_packed()


def report():
    """What each op shape decided in this process runs, and whether its batch invariance is
    guaranteed on this machine (`kernels.invariance.Verdict` rows)."""
    from kernels import invariance
    return invariance.verdicts()


def __getattr__(name: str):
    # Registering with transformers imports it; do that only when someone asks for the name.
    if name == "HF_ATTENTION":
        from kernels.mode import register_hf_attention
        register_hf_attention(_HF_ATTENTION_NAME)
        return _HF_ATTENTION_NAME
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


__all__ = ["Ops", "get_ops", "report", "backend_module", "batch_invariant_mode", "DEFAULT_SPLIT_SIZE",
           "HF_ATTENTION", "forget_packed_weights"]
