"""Benchmarks behind `rollout bench`: each suite measures a baseline in the same run and reports
ratios next to absolute numbers, with the machine it ran on."""

import gc
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout.engine import Engine
from rollout.sampling_params import SamplingParams


@dataclass(frozen=True)
class Workload:
    """A GRPO-shaped batch: `num_prompts` prompts, `n` samples each."""
    num_prompts: int = 16
    n: int = 4
    prompt_len: int = 128
    max_tokens: int = 32
    seed: int = 0

    def prompts(self, vocab: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        return [torch.randint(0, min(vocab, 256), (self.prompt_len,), generator=g).tolist()
                for _ in range(self.num_prompts)]

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=1.0, n=self.n, max_tokens=self.max_tokens,
                              seed=self.seed, ignore_eos=True)


@dataclass
class ThroughputResult:
    label: str
    seconds: float
    prompt_tokens: int
    output_tokens: int
    steps: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def run_throughput(engine: Engine, workload: Workload, label: str) -> ThroughputResult:
    prompts = workload.prompts(engine.model_config.vocab_size)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
    stats = engine.scheduler.stats
    steps0, prefill0 = stats.steps, stats.prefill_tokens
    start = time.perf_counter()
    outputs = engine.generate(prompts, workload.params(), use_tqdm=False)
    seconds = time.perf_counter() - start
    out_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return ThroughputResult(label, seconds, stats.prefill_tokens - prefill0, out_tokens,
                            stats.steps - steps0)


def bench_throughput(model: str | None, workload: Workload, **engine_kwargs) -> list[str]:
    """Deterministic (batch-invariant) kernels against the fastest plain torch ops, for each
    dtype (float32 and bfloat16 unless one is named)."""
    dtype = engine_kwargs.pop("dtype", "auto")
    dtypes = ["float32", "bfloat16"] if dtype == "auto" else [dtype]
    lines = [f"throughput: {workload.num_prompts} prompts x n={workload.n}, "
             f"{workload.prompt_len} prompt tokens, {workload.max_tokens} output tokens each",
             f"  {'dtype':<10}{'mode':<22}{'seconds':>9}{'steps':>7}{'prefill tok':>13}"
             f"{'output tok/s':>14}{'total tok/s':>13}"]
    costs = []
    for dt in dtypes:
        results, proofs = [], 0.0
        for deterministic in (False, True):
            engine = Engine(model, dtype=dt, deterministic=deterministic, **engine_kwargs)
            label = "deterministic=True" if deterministic else "deterministic=False"
            results.append(run_throughput(engine, workload, label))
            proofs = engine.runner.kernel_prepare_seconds
            engine.shutdown()
            del engine
            gc.collect()
        for r in results:
            lines.append(f"  {dt:<10}{r.label:<22}{r.seconds:>9.2f}{r.steps:>7}"
                         f"{r.prompt_tokens:>13}{r.output_tok_s:>14.1f}{r.total_tok_s:>13.1f}")
        fast, det = results
        costs.append(f"  cost of deterministic=True, {dt}: "
                     f"{(fast.total_tok_s / det.total_tok_s - 1) * 100:+.1f}% time (throughput "
                     f"ratio det/fast = {det.total_tok_s / fast.total_tok_s:.3f}; proofs at "
                     f"start {proofs:.1f} s, not timed)")
    return lines + costs


def _peer(role: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rollout.bench_peers", role,
                             json.dumps(kwargs)], stdout=subprocess.PIPE, text=True)


def _peer_result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench peer exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_weight_sync(model: str | None, workload: Workload, **engine_kwargs) -> list[str]:
    """GB/s of a full weight update through each transport, next to a plain copy of the same
    tensors into same-shaped, already-touched tensors (the least an in-place update must do),
    all in this run. Each transport sends twice with one sender, as a trainer does every step:
    the first includes one-time setup (connections, shared-memory pages), the second is the
    steady state. The trainer holds float32 weights; bytes counted are the trainer's."""
    from rollout.bench_peers import trainer_weights
    from rollout.presets import preset_path
    path = model or str(preset_path())
    engine = Engine(path, num_kv_blocks=16, **engine_kwargs)
    named = trainer_weights(path)
    nbytes = sum(t.numel() * t.element_size() for t in named.values())
    bucket, repeats = 512 << 20, 2
    rows: list[tuple[str, list[float]]] = []

    dst = {n: torch.zeros_like(t) for n, t in named.items()}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for n, t in named.items():
            dst[n].copy_(t)
        seconds.append(time.perf_counter() - start)
    rows.append(("plain tensor copy (baseline)", seconds))
    del dst

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.update_weights(named.items())
        seconds.append(time.perf_counter() - start)
    rows.append(("in-process update_weights", seconds))

    address = engine.start_weight_receiver("tcp://127.0.0.1:0", timeout_s=600)
    for mode, share, label in (("bytes", False, "ZMQ tcp, bytes"),
                               ("handle", False, "ZMQ handle, staged in shared memory"),
                               ("handle", True, "ZMQ handle, trainer tensors shared")):
        result = _peer_result(_peer("zmq", address=address, mode=mode, path=path,
                                    bucket_bytes=bucket, repeats=repeats, share=share))
        rows.append((label, result["seconds"]))

    port = _free_port()
    trainer = _peer("gloo", port=port, path=path, bucket_bytes=bucket, repeats=repeats)
    engine.init_weights_update_group("127.0.0.1", port, 1, 2, "bench", "gloo")
    names, dtypes, shapes = zip(*[(n, t.dtype, tuple(t.shape)) for n, t in named.items()])
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.update_weights_from_distributed(list(names), list(dtypes), list(shapes),
                                               group_name="bench", bucket_bytes=bucket)
        seconds.append(time.perf_counter() - start)
    rows.append(("gloo broadcast, 1 trainer + 1 engine", seconds))
    _peer_result(trainer)

    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file
        save_file({n: t.contiguous() for n, t in named.items()},
                  str(Path(tmp) / "model.safetensors"))
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.update_weights_from_disk(tmp)
            seconds.append(time.perf_counter() - start)
        rows.append(("disk (safetensors, page cache warm)", seconds))
    engine.shutdown()

    base = nbytes / rows[0][1][-1] / 1e9
    lines = [f"weight-sync: {nbytes / 1e6:.0f} MB of float32 trainer weights into a "
             f"{engine.runner.dtype} engine, buckets of {bucket >> 20} MiB",
             f"  {'transport':<40}{'first s':>9}{'steady s':>10}{'GB/s':>8}{'vs copy':>9}"]
    for label, (first, steady) in rows:
        gbs = nbytes / steady / 1e9
        lines.append(f"  {label:<40}{first:>9.3f}{steady:>10.3f}{gbs:>8.2f}{gbs / base:>8.0%}")
    return lines


def bench_memory(model: str | None, workload: Workload, **engine_kwargs) -> list[str]:
    """Release and resume times, with the process's resident memory read from the OS, next to
    a plain copy of the weight bytes measured in the same run."""
    from rollout.memory import resident_bytes
    engine_kwargs.setdefault("kv_cache_memory", 1 << 30)
    engine = Engine(model, **engine_kwargs)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    stats = engine.memory_stats()
    src = torch.ones(stats["weights"] // 4)
    dst = torch.zeros_like(src)
    start = time.perf_counter()
    dst.copy_(src)
    copy_s = time.perf_counter() - start
    del src, dst
    lines = [f"memory: weights {stats['weights'] / 1e6:.0f} MB, KV cache "
             f"{stats['kv_cache'] / 1e6:.0f} MB ({engine.runner.device})",
             f"  plain copy of the weight bytes (baseline): {copy_s:.3f} s",
             f"  {'step':<46}{'seconds':>9}{'RSS after (MB)':>16}"]
    steps = [("release both, weights='backup'", lambda: engine.release_memory()),
             ("resume both (weights restored)", lambda: engine.resume_memory()),
             ("release both, weights='discard'", lambda: engine.release_memory(weights="discard")),
             ("resume weights only (empty, awaiting update)",
              lambda: engine.resume_memory(["weights"])),
             ("resume kv_cache", lambda: engine.resume_memory(["kv_cache"]))]
    lines.append(f"  {'(start)':<46}{'':>9}{resident_bytes() / 1e6:>16.0f}")
    for label, action in steps:
        start = time.perf_counter()
        action()
        lines.append(f"  {label:<46}{time.perf_counter() - start:>9.3f}"
                     f"{resident_bytes() / 1e6:>16.0f}")
    engine.shutdown()
    return lines


SUITES = {"throughput": bench_throughput, "weight-sync": bench_weight_sync,
          "memory": bench_memory}
