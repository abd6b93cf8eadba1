"""Phase timing: off by default (nothing is recorded), on it accounts for the step loop."""

import time

import pytest

from rollout import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine(qwen3_path):
    return Engine(str(qwen3_path), block_size=16, num_kv_blocks=64)


def test_phases_are_not_recorded_unless_started(engine):
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not engine.runner.timer.seconds


def test_phases_cover_the_loop_and_nest_attention_in_forward(engine):
    prompts = [list(range(1, 40)), list(range(5, 25))]
    engine.runner.timer.start()
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=6, n=2, ignore_eos=True),
                    use_tqdm=False)
    wall = time.perf_counter() - start
    seconds, calls = engine.runner.timer.stop(), engine.runner.timer.calls
    assert calls["prefill forward"] == 1 and calls["decode forward"] == 5
    assert calls["sampling"] == 6 and calls["schedule"] >= 6
    layers = engine.model_config.num_layers
    prefill, decode = "attention, prefill chunks", "attention, decode rows"
    assert calls[prefill] == 6 * layers  # every forward stores K/V under this span
    assert calls[decode] == 5 * layers
    forward = seconds["prefill forward"] + seconds["decode forward"]
    assert 0 < seconds[prefill] and 0 < seconds[decode]
    assert seconds[prefill] + seconds[decode] < forward
    assert sum(v for k, v in seconds.items() if not k.startswith("attention")) <= wall
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert engine.runner.timer.calls["sampling"] == 6  # stopped: nothing more recorded
