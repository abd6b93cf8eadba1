"""Determinism on whatever machine this runs on, under two BLAS configurations (the default one,
and one thread with MKL's conditional numerical reproducibility set to COMPATIBLE), each compared
within itself: batch invariance, score = generation and trainer parity, bitwise, for float32 and
bfloat16, on checkpoints with head_dim 16/32/64, grouped-query ratios 1/2/3 and hidden sizes
that are not multiples of 64."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout.presets import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(vocab_size=384, num_hidden_layers=2, max_position_embeddings=512,
            initializer_range=0.1)
ZOO = {  # name: (architecture, config): head_dim, GQA ratio, hidden size
    "qwen2-d16-gqa1-h80": ("Qwen2ForCausalLM", dict(hidden_size=80, intermediate_size=144,
                                                    num_attention_heads=5,
                                                    num_key_value_heads=5)),
    "qwen3-d32-gqa2-h96": ("Qwen3ForCausalLM", dict(hidden_size=96, intermediate_size=176,
                                                    num_attention_heads=4,
                                                    num_key_value_heads=2, head_dim=32)),
    "llama-d64-gqa3-h210": ("LlamaForCausalLM", dict(hidden_size=210, intermediate_size=232,
                                                     num_attention_heads=6,
                                                     num_key_value_heads=2, head_dim=64,
                                                     tie_word_embeddings=True)),
}
CONFIGS = {
    "default": ({}, None),
    "one-thread-cbwr-compatible": ({"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}, 1),
}
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return {name: (arch, str(make_checkpoint(tmp_path_factory.mktemp(name), arch, seed=0,
                                             **{**BASE, **cfg})))
            for name, (arch, cfg) in ZOO.items()}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_determinism_holds_within_each_blas_configuration(zoo, config):
    env, threads = CONFIGS[config]
    spec = {"threads": threads, "checkpoints": zoo, "dtypes": DTYPES}
    done = subprocess.run([sys.executable, "-m", "tests.portability_suite", json.dumps(spec)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(ZOO) * len(DTYPES) * 10
    failed = [r for r in results if r.get("signatures", 1) != 1 or r.get("max_diff", 0.0) != 0.0]
    assert not failed, "\n".join(map(json.dumps, failed))
