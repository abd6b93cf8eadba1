"""Benchmarks behind `rollout bench`: each suite measures a baseline in the same run and reports
ratios next to absolute numbers, with the machine it ran on."""

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rollout.bench_throughput import bench_throughput
from rollout.bench_workload import BenchOptions, SuiteResult, Workload
from rollout.engine import Engine
from rollout.presets import preset_path
from rollout.sampling_params import SamplingParams


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


def bench_weight_sync(model: str | None, workload: Workload, options: BenchOptions,
                      **engine_kwargs) -> SuiteResult:
    """GB/s of a full weight update through each transport, next to a plain copy of the same
    tensors into same-shaped, already-touched tensors (the least an in-place update must do),
    all in this run. Each transport sends twice with one sender, as a trainer does every step:
    the first includes one-time setup (connections, shared-memory pages), the second is the
    steady state. The trainer holds float32 weights; bytes counted are the trainer's."""
    from rollout.bench_peers import trainer_weights
    path = model or str(preset_path())
    engine_kwargs.setdefault("num_kv_blocks", 16)
    engine = Engine(path, **engine_kwargs)
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

    _one_step(engine)  # the engine holds what a serving one does (packed weights)
    warm = _one_step(engine)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.update_weights(named.items())
        seconds.append(time.perf_counter() - start)
    rows.append(("in-process update_weights", seconds))
    after = _one_step(engine)  # rebuilds what the update dropped (the CPU's packed weights)

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
    data = {"bytes": nbytes, "bucket_bytes": bucket, "engine_dtype": str(engine.runner.dtype),
            "transports": {}}
    for label, (first, steady) in rows:
        gbs = nbytes / steady / 1e9
        lines.append(f"  {label:<40}{first:>9.3f}{steady:>10.3f}{gbs:>8.2f}{gbs / base:>8.0%}")
        data["transports"][label] = {"first_s": first, "steady_s": steady, "gb_per_s": gbs,
                                     "vs_copy": gbs / base}
    lines.append(f"  and the first engine step after an update: {after:.3f} s, against "
                 f"{warm:.3f} s warm ({after - warm:+.3f} s: weights prepared again, e.g. the "
                 f"CPU's packed copies; not in the times above)")
    data["first_step_after_update_s"], data["warm_step_s"] = after, warm
    return SuiteResult(lines, data)


def _one_step(engine: Engine) -> float:
    """Seconds of a one-token generation (prefill of a short prompt)."""
    start = time.perf_counter()
    engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1), use_tqdm=False)
    return time.perf_counter() - start


def bench_memory(model: str | None, workload: Workload, options: BenchOptions,
                 **engine_kwargs) -> SuiteResult:
    """Release and resume times, with the memory in use read from the OS (the process's resident
    set on the CPU, the driver's used bytes on CUDA), next to a plain copy of the weight bytes on
    the same device, measured in the same run."""
    from rollout.memory import bytes_in_use
    engine_kwargs.setdefault("kv_cache_memory", 1 << 30)
    engine = Engine(model, **engine_kwargs)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    stats, device = engine.memory_stats(), engine.runner.device
    column = "RSS after (MB)" if device.type == "cpu" else "GPU used after (MB)"
    width = len(column) + 2
    src = torch.ones(stats["weights"] // 4, device=device)
    dst = torch.zeros_like(src)
    start = time.perf_counter()
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    copy_s = time.perf_counter() - start
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lines = [f"memory: weights {stats['weights'] / 1e6:.0f} MB, KV cache "
             f"{stats['kv_cache'] / 1e6:.0f} MB ({device})",
             f"  plain copy of the weight bytes (baseline): {copy_s:.3f} s",
             f"  {'step':<46}{'seconds':>9}{column:>{width}}"]
    steps = [("release both, weights='backup'", lambda: engine.release_memory()),
             ("resume both (weights restored)", lambda: engine.resume_memory()),
             ("release both, weights='discard'", lambda: engine.release_memory(weights="discard")),
             ("resume weights only (empty, awaiting update)",
              lambda: engine.resume_memory(["weights"])),
             ("resume kv_cache", lambda: engine.resume_memory(["kv_cache"]))]
    in_use = bytes_in_use(device)
    lines.append(f"  {'(start)':<46}{'':>9}{in_use / 1e6:>{width}.0f}")
    data = {"weight_bytes": stats["weights"], "kv_cache_bytes": stats["kv_cache"],
            "copy_s": copy_s, "device": str(device), "in_use_start": in_use, "steps": {}}
    for label, action in steps:
        start = time.perf_counter()
        action()
        seconds, in_use = time.perf_counter() - start, bytes_in_use(device)
        lines.append(f"  {label:<46}{seconds:>9.3f}{in_use / 1e6:>{width}.0f}")
        data["steps"][label] = {"seconds": seconds, "in_use_after": in_use}
    engine.shutdown()
    return SuiteResult(lines, data)


SUITES = {"throughput": bench_throughput, "weight-sync": bench_weight_sync,
          "memory": bench_memory}
