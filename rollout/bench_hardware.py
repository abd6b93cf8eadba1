"""What the hardware can do, measured in the same run as the engine, and the model work a
workload needs: the yardsticks for `rollout bench`'s two hardware lines."""

import time

import torch

from kernels import cpu
from rollout.bench_workload import Workload
from rollout.config import ModelConfig

MATMUL_SHAPE = (2048, 1024, 3072)  # M, K, N: one layer's MLP on a big prefill


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_s(dtype: torch.dtype, device: torch.device,
                       repeats: int = 3) -> dict[str, float]:
    """FLOP/s of one large matmul of this dtype through each call the machine offers (torch's
    matmul, i.e. vendor BLAS; on the CPU also oneDNN's linear on a weight packed once, the
    engine's own call): the fastest is the peak to compare with."""
    m, k, n = MATMUL_SHAPE
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    calls = {"torch matmul": lambda: a @ b}
    packed = cpu.pack_weight(b) if device.type == "cpu" else None
    if packed is not None:
        calls["oneDNN linear, packed weight"] = lambda: cpu.packed_mm(a, packed)
    return {name: 2 * m * k * n / _best_seconds(call, device, repeats)
            for name, call in calls.items()}


def copy_bytes_per_s(device: torch.device, nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Memory bandwidth of a large tensor copy, counting the bytes read and the bytes written."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.zeros_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device, repeats)


def _token_flops(cfg: ModelConfig, position: int) -> int:
    """One token through the decoder layers at `position` (0-based; it attends to position + 1
    keys): 2 FLOPs per weight of every linear layer, plus q.k and p.v."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    linear = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * i
    return cfg.num_layers * (2 * linear + 4 * cfg.q_size * (position + 1))


def model_flops(cfg: ModelConfig, workload: Workload) -> int:
    """The model work the workload needs, whichever system runs it: each prompt through the
    model once (a group shares it), each sample's response tokens after the first, and the
    logits of every sampled token (the n first tokens of a request share one row). Padding,
    tiles and recomputation are not counted."""
    head = 2 * cfg.hidden_size * cfg.vocab_size
    total = 0
    for p, length in zip(workload.prompt_lengths(), workload.response_lengths()):
        total += sum(_token_flops(cfg, pos) for pos in range(p))
        total += workload.n * sum(_token_flops(cfg, pos) for pos in range(p, p + length - 1))
        total += (1 + workload.n * (length - 1)) * head
    return total
