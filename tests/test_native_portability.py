"""The C kernels (kernels/native.c) give the same bits whatever vector instructions the
compiler was allowed: their order of arithmetic is the code's."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu


def _rand(*shape, seed, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _native_outputs() -> dict[str, torch.Tensor]:
    """Every C kernel on small inputs, both dtypes: attention (prefill, decode with a shared
    prompt, the trainer's causal), RMSNorm, the rotary embedding, row sums."""
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        q = _rand(70, 16, 128, seed=1, dtype=dtype)
        k, v = _rand(70, 8, 128, seed=2, dtype=dtype), _rand(70, 8, 128, seed=3, dtype=dtype)
        outs[f"causal {name}"] = cpu.causal_attention(q, k, v, 0.09, 32)
        k_cache = torch.zeros(6, 8, 128, 32, dtype=dtype)
        v_cache = torch.zeros(6, 8, 32, 128, dtype=dtype)
        table, pos = torch.tensor([4, 1, 3]), torch.arange(70)
        cpu.store_kv(k, v, k_cache, v_cache, table[pos // 32] * 32 + pos % 32)
        outs[f"prefill {name}"] = cpu.prefill_attention(q[5:40], k_cache, v_cache, table,
                                                        pos[5:40], 0.09)
        rows = torch.tensor([69, 40, 33, 3])
        outs[f"decode {name}"] = cpu.decode_attention(q[rows], k_cache, v_cache,
                                                      table.expand(4, -1), rows + 1, 0.09)
        # head_dim 40, blocks of 8: neither a whole number of vectors (the scalar loops)
        q40, k40 = _rand(37, 4, 40, seed=9, dtype=dtype), _rand(37, 2, 40, seed=10, dtype=dtype)
        outs[f"causal d40 s8 {name}"] = cpu.causal_attention(q40, k40, k40 * 2, 0.15, 8)
        x = _rand(9, 1024, seed=4, dtype=dtype)
        outs[f"rms_norm {name}"] = cpu.rms_norm(x, _rand(1024, seed=5, dtype=dtype), 1e-6)
        angle = _rand(70, 1, 128, seed=6, dtype=torch.float32) * 9
        outs[f"rotate {name}"] = cpu.rotate(q, angle.cos().to(dtype), angle.sin().to(dtype))
    outs["row_sum"] = cpu.row_sum(_rand(5, 1000, seed=7, dtype=torch.float32))
    return outs


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="rebuilds the kernels for the baseline x86-64 instruction set")
def test_the_c_kernels_give_the_same_bits_without_vector_extensions(tmp_path, monkeypatch):
    """Built for this CPU (-march=native: AVX-512 or AVX2 vectors here) and for the oldest x86-64
    (SSE2 only: attention's fused multiply-adds call libm's fmaf, also in its software version),
    the C kernels give the same bits: their order of arithmetic is the code's, not the vector
    width's or the CPU's."""
    from kernels import native
    monkeypatch.delenv("ROLLOUT_CPU_KERNELS", raising=False)
    native.library.cache_clear()
    if native.library() is None:
        pytest.fail("the C kernels did not build on this machine")
    here = _native_outputs()
    wrapper = tmp_path / "cc-baseline"
    wrapper.write_text('#!/bin/sh\nfor a; do shift; [ "$a" = -march=native ] && '
                       'a=-march=x86-64; set -- "$@" "$a"; done\nexec "$REAL_CC" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("REAL_CC", native._compiler())
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("ROLLOUT_KERNEL_CACHE", str(tmp_path / "kernels"))
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no fused multiply-add instruction"):
            assert native.library() is not None  # SSE2 has none: attention calls libm's fmaf
        assert list((tmp_path / "kernels").glob("native-*.so"))  # built here, by the wrapper
        baseline = _native_outputs()
        software = _outputs_in_a_process_without_fma(tmp_path)
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    for name, out in here.items():
        assert torch.equal(out, baseline[name]), name
        assert torch.equal(out, software[name]), name


def _outputs_in_a_process_without_fma(tmp_path) -> dict[str, torch.Tensor]:
    """`_native_outputs()` of the baseline build (the environment's CC and cache) in a process
    where glibc takes its software fmaf (its FMA and AVX2 versions masked off): libm's exact
    emulation, as on a CPU without the instruction."""
    out = tmp_path / "software-fma.pt"
    code = ("import torch; from tests.test_native_portability import _native_outputs; "
            f"torch.save(_native_outputs(), {str(out)!r})")
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-FMA,-AVX2"}
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, env=env,
                   cwd=Path(__file__).resolve().parents[1], timeout=600)
    return torch.load(out)
