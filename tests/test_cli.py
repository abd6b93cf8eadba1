"""`rollout generate` as a new user runs it from the README, in a fresh process."""

import ast
import json
import os
import subprocess
import sys


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


def test_doctor_prints_what_runs_and_whether_invariance_is_guaranteed(qwen3_path):
    done = run_cli("doctor", "--model", str(qwen3_path))
    assert done.returncode == 0, done.stderr
    for op in ("linear", "row_sum", "attention q.k", "attention p.v"):
        assert f"\n{op} " in done.stdout
    assert "batch invariance: GUARANTEED on this machine" in done.stdout
    fast = run_cli("doctor", "--model", str(qwen3_path), "--fast")
    assert fast.returncode == 1 and "NOT GUARANTEED (deterministic=False)" in fast.stdout
