"""The CLI (`rollout generate | bench | doctor`) as a new user runs it, in a fresh process."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import torch

from kernels import native
from rollout.bench_workload import Workload
from tests.test_invariance import FORWARD_OPS


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rollout.cli", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def test_generate_with_model(qwen3_path):
    done = run_cli("generate", "--model", str(qwen3_path), "--prompt", "hello", "--max-tokens",
                   "5", "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out["outputs"][0]["token_ids"]) == 5
    assert out["outputs"][0]["finish_reason"] == "length"
    first = out["outputs"][0]["token_ids"][0]
    done = run_cli("generate", "--model", str(qwen3_path), "--prompt", "hello", "--max-tokens",
                   "5", "--temperature", "0", "--json", "--min-tokens", "2",
                   "--stop-token-ids", str(first), "--top-logprobs", "2")
    assert done.returncode == 0, done.stderr
    held = json.loads(done.stdout)["outputs"][0]
    assert held["token_ids"][0] != first and len(held["top_logprobs"][0]) == 2
    done = run_cli("generate", "--model", str(qwen3_path), "--prompt", "hello", "--max-tokens",
                   "1", "--top-logprobs", "2")
    assert done.returncode == 0 and "top_logprobs=[{" in done.stdout, done.stderr


def test_generate_without_model_uses_the_builtin_preset_and_prints_text(tmp_path):
    done = run_cli("generate", "--prompt", "Hello", "--max-tokens", "4", "--seed", "3",
                   env={"ROLLOUT_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "finish_reason=length seed=3" in done.stdout
    text = ast.literal_eval(done.stdout.splitlines()[0])
    assert len(text.split()) >= 2, done.stdout  # words, not '' or stray bytes
    assert (tmp_path / "presets" / "qwen3-0.6b-random" / "config.json").is_file()


def test_generate_reports_bad_input_without_a_traceback(qwen3_path):
    done = run_cli("generate", "--model", str(qwen3_path), "--prompt", "x", "--top-p", "2")
    assert done.returncode == 2
    assert "top_p must be in (0, 1], got 2.0" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_options_get_one_line_naming_them_before_any_work(qwen3_path, tmp_path):
    model = ("--model", str(qwen3_path))
    cases = [(("generate", *model, "--prompt-ids", "1,2", "--max-num-seqs", "0"),
              "max_num_seqs must be >= 1, got 0"),
             (("generate", *model, "--prompt-ids", "1,,2"), "--prompt-ids '1,,2'"),
             (("generate", *model, "--prompt-ids", "1,2", "--max-model-len", "-3"),
              "max_model_len must be >= 1, got -3"),
             (("serve", *model, "--port", "70000"), "port 70000 is outside 0-65535"),
             (("bench", "throughput", "--hf-prompts-per-call", "0"),
              "hf_prompts_per_call must be >= 1, got 0"),
             (("bench", "throughput", "--json", str(tmp_path / "no" / "x.json")),
              "x.json: No such file or directory"),
             (("bench", "throughput", "--json", str(tmp_path)), "Is a directory"),
             (("bench", "throughput", "--seed", "-1"), "seed must be in [0, 2**63), got -1"),
             (("bench", "throughput", "--baseline", "vllm", "--vllm-python", "/no/python"),
              "vllm_python '/no/python' is not an executable file"),
             # the prompt is read before the model loads: this model path does not exist
             (("generate", "--model", "/nonexistent", "--prompt-ids", "1,,2"),
              "--prompt-ids '1,,2'"),
             (("generate", "--model", "/nonexistent", "--prompt-ids", ""), "--prompt-ids ''"),
             (("generate", *model, "--prompt-ids", "1", "--stop-token-ids", "3,x"),
              "--stop-token-ids '3,x'"),
             (("generate", *model, "--prompt-ids", "1", "--device", "meta"),
              "device 'meta': this engine runs on 'cpu' or 'cuda'")]
    for name, broken in (("config.json", "{'x"), ("tokenizer.json", "{1: 2}")):
        copy = tmp_path / f"broken-{name}"
        shutil.copytree(qwen3_path, copy)
        (copy / name).write_text(broken)
        cases.append((("generate", "--model", str(copy), "--prompt-ids", "1"),
                      f"{str(copy / name)!r}"))
    if not torch.cuda.is_available():
        cases.append((("generate", *model, "--prompt-ids", "1", "--device", "cuda"),
                      "CUDA is not available here"))
    link = tmp_path / "report.json"  # a link to a file not written yet: checked, left alone
    link.symlink_to(tmp_path / "target.json")
    cases.append((("bench", "throughput", "--json", str(link), "--repeat", "0"),
                  "repeat must be >= 1, got 0"))
    for args, message in cases:
        done = run_cli(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-800:])
        assert "Traceback" not in done.stderr
    assert link.is_symlink() and not (tmp_path / "target.json").exists()


def test_doctor_prints_what_runs_and_whether_invariance_is_guaranteed(qwen3_path):
    done = run_cli("doctor", "--model", str(qwen3_path))
    assert done.returncode == 0, done.stderr
    # the default device, and on the CPU the kernels this environment builds
    kind = "native" if torch.cuda.is_available() or native.library() is not None else "torch"
    ops = FORWARD_OPS["cuda" if torch.cuda.is_available() else "cpu", kind]
    for op in ops:
        assert f"\n{op} " in done.stdout
    assert "batch invariance: GUARANTEED on this machine" in done.stdout
    fast = run_cli("doctor", "--model", str(qwen3_path), "--fast")
    assert fast.returncode == 1 and "NOT GUARANTEED (deterministic=False)" in fast.stdout


def test_bench_refuses_a_bad_repeat_count():
    done = run_cli("bench", "throughput", "--repeat", "0")
    assert done.returncode != 0 and "repeat must be >= 1, got 0" in done.stderr


def test_bench_against_transformers_writes_every_figure(qwen3_path, tmp_path):
    report = tmp_path / "bench.json"
    done = run_cli("bench", "throughput", "--model", str(qwen3_path), "--dtype", "float32",
                   "--baseline", "hf", "--baseline", "vllm", "--json", str(report),
                   "--num-prompts", "3", "--n", "2", "--min-prompt-len", "20",
                   "--max-prompt-len", "60", "--max-tokens", "8", "--repeat", "2",
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "speedup_vs_hf (float32):" in done.stdout
    assert "best of 2 rounds each" in done.stdout
    assert "where the time goes (rollout, float32)" in done.stdout
    assert "decode at batch 1:" in done.stdout and "GFLOP/s" in done.stdout
    if importlib.util.find_spec("vllm") is None:
        assert "vllm: not installed, skipped" in done.stdout
    data = json.loads(report.read_text())["suites"]["throughput"]
    f32 = data["float32"]
    if importlib.util.find_spec("vllm") is None:  # a skipped baseline is in the JSON too
        assert any(note.startswith("vllm: not installed") for note in f32["notes"])
    systems = f32["systems"]
    asked = 2 * sum(Workload(**data["workload"]).response_lengths())
    for name in ("rollout", "transformers", "rollout deterministic=False"):
        assert systems[name]["output_tokens"] == asked
        assert systems[name]["output_tokens_per_s"] > 0
    # transformers ran every call to its longest response: more tokens made than counted
    assert systems["transformers"]["generated_tokens"] >= asked
    assert f32["speedup_vs_hf"] == (systems["rollout"]["output_tokens_per_s"]
                                    / systems["transformers"]["output_tokens_per_s"])
    for name in ("rollout", "rollout deterministic=False", "transformers"):  # every system
        assert len(systems[name]["runs_s"]) == 2
        assert systems[name]["seconds"] == min(systems[name]["runs_s"])
    assert f32["proofs_s"] > 0  # the first round's: later rounds find the proofs cached
    assert f32["phases_s"]["decode forward (decode-only steps)"] > 0
    hardware = f32["hardware"]
    assert 0 < hardware["achieved_flops_per_s"] < hardware["matmul_flops_per_s"]
    # the peak is the fastest call measured; on the CPU the engine's own (packed oneDNN) too
    calls = hardware["matmul_flops_per_s_by_call"]
    assert hardware["matmul_flops_per_s"] == max(calls.values())
    if torch.backends.mkldnn.is_available():
        assert set(calls) == {"torch matmul", "oneDNN linear, packed weight"}
    # a decode step reads every weight but one row of this untied model's input embedding
    config = json.loads((qwen3_path / "config.json").read_text())
    vocab, hidden, layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * 32, config["num_key_value_heads"] * 32  # head_dim
    layer = (hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config["intermediate_size"]
             + 2 * hidden + 2 * 32)  # projections, MLP, 2 norms, q/k norms
    assert hardware["weight_bytes"] == 4 * (layers * layer + hidden + vocab * hidden + hidden)


def test_bench_memory_and_weight_sync_suites_run_and_write_their_figures(qwen3_path, tmp_path):
    """With engine options given (weight-sync passed num_kv_blocks twice: TypeError after the
    other suites had run); weight-sync reports the first step after an update beside it."""
    report = tmp_path / "bench.json"
    done = run_cli("bench", "memory", "weight-sync", "--model", str(qwen3_path),
                   "--num-kv-blocks", "8", "--no-progress", "--json", str(report))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "first engine step after an update" in done.stdout
    suites = json.loads(report.read_text())["suites"]
    sync = suites["weight-sync"]
    assert sync["transports"]["in-process update_weights"]["gb_per_s"] > 0
    assert sync["first_step_after_update_s"] > 0 and sync["warm_step_s"] > 0
    assert suites["memory"]
