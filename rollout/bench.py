"""Benchmarks behind `rollout bench`: each suite measures a baseline in the same run and reports
ratios next to absolute numbers, with the machine it ran on."""

import gc
import os
import platform
import time
from dataclasses import dataclass

import torch

from rollout.engine import Engine
from rollout.sampling_params import SamplingParams


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")


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
    """Deterministic (batch-invariant) kernels against the fastest plain torch ops."""
    results = []
    for deterministic in (False, True):
        engine = Engine(model, deterministic=deterministic, **engine_kwargs)
        label = "deterministic=True" if deterministic else "deterministic=False"
        results.append(run_throughput(engine, workload, label))
        del engine
        gc.collect()
    fast, det = results
    lines = [f"throughput: {workload.num_prompts} prompts x n={workload.n}, "
             f"{workload.prompt_len} prompt tokens, {workload.max_tokens} output tokens each",
             f"  {'mode':<22}{'seconds':>9}{'steps':>7}{'prefill tok':>13}{'output tok/s':>14}"
             f"{'total tok/s':>13}"]
    for r in results:
        lines.append(f"  {r.label:<22}{r.seconds:>9.2f}{r.steps:>7}{r.prompt_tokens:>13}"
                     f"{r.output_tok_s:>14.1f}{r.total_tok_s:>13.1f}")
    cost = fast.total_tok_s / det.total_tok_s - 1
    lines.append(f"  cost of deterministic=True: {cost * 100:+.1f}% time "
                 f"(throughput ratio det/fast = {det.total_tok_s / fast.total_tok_s:.3f})")
    return lines


SUITES = {"throughput": bench_throughput}
