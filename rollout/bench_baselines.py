"""The systems a user would pick instead of this engine, run on the same workload and weights:
transformers `generate`, batched as a careful user would, and vLLM's offline `LLM.generate`
(only when vllm is installed; run in its own process, as it would be deployed).

Run as `python -m rollout.bench_baselines vllm JSON_ARGS` for the vLLM side."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rollout.bench_workload import WARM_UP_PROMPT, RunResult, Workload

BASELINES = ("hf", "vllm")


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _hf_call(model, prompts: list[list[int]], new_tokens: int, n: int, pad_id: int) -> int:
    """One `generate` call: every sequence runs `new_tokens` (EOS kept out, as the engine's
    ignore_eos does), n per prompt, sampling at temperature 1 over the full vocabulary.
    Returns the tokens it generated."""
    ids, mask = (t.to(model.device) for t in left_padded(prompts, pad_id))
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, num_return_sequences=n,
                         pad_token_id=pad_id)
    made = out.shape[1] - ids.shape[1]
    if made != new_tokens or out.shape[0] != len(prompts) * n:
        raise RuntimeError(f"transformers generated {tuple(out.shape)} from {tuple(ids.shape)}; "
                           f"expected {new_tokens} new tokens for {len(prompts) * n} sequences")
    return out.shape[0] * made


@torch.inference_mode()
def run_hf(path: str, workload: Workload, dtype: torch.dtype, device: torch.device,
           prompts_per_call: int, progress=None) -> RunResult:
    """`prompts_per_call` prompts per `generate` call (grouped by length, so little padding),
    left-padded, num_return_sequences=n; each call runs until its longest response is done.
    Only the tokens each request asked for count as output."""
    import transformers
    if progress is None:  # --no-progress: no loading bar either
        transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    pad_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    prompts, lengths = workload.prompts(model.config.vocab_size), workload.response_lengths()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    _hf_call(model, [WARM_UP_PROMPT], 2, 1, pad_id)
    torch.manual_seed(workload.seed)
    generated, calls = 0, 0
    start = time.perf_counter()
    for lo in range(0, len(order), prompts_per_call):
        group = order[lo:lo + prompts_per_call]
        want = [lengths[i] for i in group]
        generated += _hf_call(model, [prompts[i] for i in group], max(want), workload.n, pad_id)
        calls += 1
        if progress is not None:
            progress.update(workload.n * sum(want))
    seconds = time.perf_counter() - start
    return RunResult("transformers", seconds, workload.prompt_tokens, workload.output_tokens,
                     {"calls": calls, "prompts_per_call": prompts_per_call,
                      "generated_tokens": generated})


@functools.cache
def vllm_available(python: str | None = None) -> bool:
    """Whether vllm imports here, or in the interpreter `python` (its own venv); asked once."""
    if python is None:
        return importlib.util.find_spec("vllm") is not None
    try:
        return subprocess.run([python, "-c", "import vllm"], capture_output=True,
                              timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _vllm_env(python: str | None) -> dict[str, str]:
    """The child's environment: this package importable from vLLM's own venv, and on the CPU
    the same cores this engine computes on (vLLM's default on a small machine keeps one core
    back for itself). VLLM_* variables already set win."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cores = sorted(os.sched_getaffinity(0))[:torch.get_num_threads()]
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def run_vllm(path: str, workload: Workload, dtype: torch.dtype, kv_cache_bytes: int,
             python: str | None = None) -> RunResult:
    """vLLM in a child process (its own memory and threads, gone afterwards; `python`: an
    interpreter of vLLM's own venv), with the KV cache memory this engine had (on the CPU vLLM
    otherwise reserves 92% of the host's memory) and, on the CPU, this engine's cores."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = {"path": path, "workload": asdict(workload), "kv_cache_bytes": kv_cache_bytes,
                "dtype": str(dtype).removeprefix("torch."), "out": str(out)}
        done = subprocess.run([python or sys.executable, "-m", "rollout.bench_baselines", "vllm",
                               json.dumps(args)], capture_output=True, text=True, timeout=3600,
                              env=_vllm_env(python))
        if done.returncode != 0 or not out.is_file():
            fd, log = tempfile.mkstemp(prefix="rollout-vllm-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(done.stdout + done.stderr)
            errors = [line for line in done.stderr.splitlines() if "Error" in line]
            tail = "\n".join((errors or done.stderr.strip().splitlines())[-3:])
            raise RuntimeError(f"the vLLM baseline exited with {done.returncode} (its whole "
                               f"output: {log}):\n{tail}")
        data = json.loads(out.read_text())
    if data["output_tokens"] != workload.output_tokens:  # as the engine's run is checked
        raise RuntimeError(f"vLLM made {data['output_tokens']} output tokens; the workload "
                           f"asks {workload.output_tokens}")
    return RunResult("vllm", data["seconds"], workload.prompt_tokens, data["output_tokens"],
                     {"vllm_version": data["version"], "kv_cache_bytes": kv_cache_bytes})


def _vllm_child(path: str, workload: dict, dtype: str, kv_cache_bytes: int, out: str) -> None:
    import vllm
    w = Workload(**workload)
    prompts = [{"prompt_token_ids": p} for p in w.prompts(_vocab_size(path))]
    # No per-request seeds: vLLM 0.32's CPU runner fails on a seeded request whose prefill is
    # chunked ("CPU Generator does not use offset"); the engine-wide seed is the workload's.
    # Unseeded sampling is also vLLM's faster path, so this favours vLLM.
    params = [vllm.SamplingParams(n=p.n, temperature=1.0, top_p=1.0, max_tokens=p.max_tokens,
                                  ignore_eos=True, detokenize=False)
              for p in w.params()]
    llm = vllm.LLM(model=path, dtype=dtype, seed=w.seed, kv_cache_memory_bytes=kv_cache_bytes,
                   max_model_len=w.max_prompt_len + w.max_tokens + 16)
    llm.generate([{"prompt_token_ids": WARM_UP_PROMPT}], vllm.SamplingParams(max_tokens=2),
                 use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    Path(out).write_text(json.dumps({"seconds": seconds, "output_tokens": tokens,
                                     "version": vllm.__version__}))


def _vocab_size(path: str) -> int:
    from rollout.config import ModelConfig
    return ModelConfig.from_pretrained(path).vocab_size


if __name__ == "__main__":
    if sys.argv[1] != "vllm":
        raise SystemExit(f"unknown baseline {sys.argv[1]!r}; run as: vllm JSON_ARGS")
    _vllm_child(**json.loads(sys.argv[2]))
