"""Shared fixtures: small random-weight Hugging Face checkpoints, written by transformers itself
and loaded through the same path as a real checkpoint."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Ray clusters that tests start listen on the loopback address only, not the machine's network
# address (Ray reads this when it is imported; its workers inherit it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from rollout.presets import make_checkpoint  # noqa: E402

SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
             initializer_range=0.1)

CHECKPOINTS = {
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32)),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "llama-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-untied": ("LlamaForCausalLM", dict(tie_word_embeddings=False, num_key_value_heads=4)),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> path of a small checkpoint, built on first use."""
    made = {}

    def get(name: str):
        if name not in made:
            arch, extra = CHECKPOINTS[name]
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name), arch, seed=0,
                                         **{**SMALL, **extra})
        return made[name]
    return get


@pytest.fixture(scope="session")
def qwen3_path(checkpoints):
    return checkpoints("qwen3")


@pytest.fixture(params=["native", "torch"])
def cpu_kernels(request, monkeypatch):
    """Each CPU kernel implementation in turn: the C kernels (kernels/native.c) and the
    torch ops a machine without a C compiler runs (chosen as a user would, by environment)."""
    from kernels import native
    monkeypatch.setenv("ROLLOUT_CPU_KERNELS", request.param)
    native.library.cache_clear()
    if request.param == "native" and native.library() is None:
        pytest.fail("the C kernels did not build on this machine")
    yield request.param
    monkeypatch.undo()
    native.library.cache_clear()


REPORT = pytest.StashKey[list]()


@pytest.fixture
def report(request):
    """report(line): shown in pytest's summary whether or not output is captured (numbers a
    test measures, such as server latencies)."""
    return request.config.stash.setdefault(REPORT, []).append


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(REPORT, [])
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)
