"""Contract 3: the engine gives its memory back, really, and takes it again unchanged."""

import threading
import time

import pytest
import torch

from rollout import Engine, SamplingParams
from rollout.loader import checkpoint_manifest, iter_checkpoint
from rollout.memory import bytes_in_use
from rollout.presets import make_checkpoint
from rollout.weights import IncompleteWeightsError
from tests.peers import trained
from tests.test_weight_sync import assert_matches

PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 160))]
SEEDED = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)


def in_use(engine) -> int:
    """Bytes in use on the engine's device (the process's resident set on the CPU)."""
    return bytes_in_use(engine.config.device)


def outputs(engine, params=SEEDED):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs)
            for o in engine.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def medium_path(tmp_path_factory):
    """About 150 MB of float32 weights."""
    return make_checkpoint(tmp_path_factory.mktemp("medium"), "Qwen3ForCausalLM", seed=0,
                           vocab_size=32000, hidden_size=512, intermediate_size=1536,
                           num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                           head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def medium(medium_path):
    return Engine(str(medium_path), num_kv_blocks=512)  # 100 MB of KV cache


def test_release_really_gives_memory_back_and_resume_takes_it(medium):
    stats = medium.memory_stats()
    held = stats["weights"] + stats["kv_cache"]
    assert stats["weights"] >= 100e6 and stats["kv_cache"] >= 90e6
    expected = outputs(medium)
    for mode in ("backup", "discard"):
        before = in_use(medium)
        medium.release_memory(weights=mode)
        released = in_use(medium)
        assert before - released >= 0.9 * held, (mode, before - released, held)
        assert medium.memory_stats()["released"] == {"weights": stats["weights"],
                                                      "kv_cache": stats["kv_cache"]}
        medium.resume_memory()
        if mode == "discard":
            medium.update_weights_from_disk(str(medium.config.model))
        assert outputs(medium) == expected  # bitwise: tokens and log-prob floats
        assert in_use(medium) - released >= 0.9 * held


def test_twenty_cycles_do_not_leak(medium):
    outputs(medium)
    medium.release_memory()
    medium.resume_memory()
    outputs(medium)  # steady state: with the packed weight copies a step makes again
    start = in_use(medium)
    for _ in range(20):
        medium.release_memory()
        medium.resume_memory()
        outputs(medium)
    assert abs(in_use(medium) - start) <= 0.05 * start


@pytest.fixture
def engine(qwen3_path):
    return Engine(str(qwen3_path), num_kv_blocks=64)


def test_generating_while_released_says_to_resume(engine):
    for tags in (["kv_cache"], ["weights"], None):
        engine.release_memory(tags)
        with pytest.raises(RuntimeError, match="memory is released .* call resume_memory"):
            engine.generate(PROMPTS, SEEDED, use_tqdm=False)
        engine.resume_memory(tags)
    assert outputs(engine)


def test_releasing_or_resuming_twice_is_a_no_op(engine):
    expected = outputs(engine)
    engine.release_memory()
    engine.release_memory()
    assert engine.memory_stats()["weights"] == engine.memory_stats()["kv_cache"] == 0
    engine.resume_memory()
    engine.resume_memory()
    assert outputs(engine) == expected


LONG = SamplingParams(temperature=1.0, seed=5, max_tokens=300, ignore_eos=True)


def generate_in_background(engine):
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=engine.generate(PROMPTS, LONG,
                                                                           use_tqdm=False)))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            s.num_output_tokens >= 3 for r in list(engine._requests.values()) for s in r.seqs):
        time.sleep(0.002)
    return thread, box


def test_release_while_running_retracts_then_finishes_unchanged(engine):
    expected = outputs(engine, LONG)
    thread, box = generate_in_background(engine)
    engine.release_memory()
    assert engine.memory_stats()["kv_cache"] == 0 and thread.is_alive()
    engine.resume_memory()
    thread.join(timeout=120)
    assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in box["out"]] == expected


def test_release_while_running_with_abort_keeps_partial_outputs(engine):
    thread, box = generate_in_background(engine)
    engine.release_memory(pause_mode="abort")
    thread.join(timeout=60)
    assert all(o.outputs[0].finish_reason == "abort" for o in box["out"])
    assert any(len(o.outputs[0].logprobs) >= 3 for o in box["out"])


def test_in_place_cannot_keep_requests_across_a_kv_cache_release(engine):
    thread, _ = generate_in_background(engine)
    try:
        with pytest.raises(ValueError, match="in_place.*cannot keep requests across a kv_cache"):
            engine.release_memory(pause_mode="in_place")
        assert engine.memory_stats()["kv_cache"] > 0
    finally:
        engine.pause_generation("abort")
        thread.join(timeout=60)
        engine.continue_generation()


def test_a_release_of_what_is_released_leaves_requests_alone(engine):
    """A second release (or one of memory already given back) pauses nothing: it aborted the
    requests the first had retracted. Requests that wait and hold no K/V may stay in place
    across a KV cache release."""
    expected = outputs(engine, LONG)
    thread, box = generate_in_background(engine)
    engine.release_memory(["weights"])  # retracted: they wait for the weights
    engine.release_memory(["weights"], pause_mode="abort")
    engine.release_memory(["kv_cache"], pause_mode="in_place")  # none holds K/V now
    assert engine.memory_stats()["kv_cache"] == 0 and thread.is_alive()
    engine.resume_memory()
    thread.join(timeout=120)
    assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in box["out"]] == expected


def test_generating_after_discard_names_the_missing_update(engine, qwen3_path):
    engine.release_memory(weights="discard")
    engine.resume_memory()
    with pytest.raises(IncompleteWeightsError, match="discarded by release_memory.*update"):
        engine.generate(PROMPTS, SEEDED, use_tqdm=False)
    partial = [(n, t) for n, t in trained(qwen3_path, 1).named_parameters() if "layers.0" in n]
    with pytest.raises(ValueError, match="not usable .*discarded"):
        engine.update_weights(partial)
    model = trained(qwen3_path, 1)
    engine.update_weights(model.named_parameters())
    assert_matches(model, PROMPTS, outputs(engine, SamplingParams(temperature=0, max_tokens=6)))


def test_update_into_discarded_weights_lands_in_fresh_storage(engine, qwen3_path):
    engine.release_memory(weights="discard")
    assert engine.memory_stats()["weights"] == 0
    model = trained(qwen3_path, 2)
    engine.update_weights(model.named_parameters())
    assert engine.memory_stats()["weights"] > 0 and engine.memory_stats()["kv_cache"] == 0
    engine.resume_memory(["kv_cache"])
    assert_matches(model, PROMPTS, outputs(engine, SamplingParams(temperature=0, max_tokens=6)))


def test_staged_resume_never_holds_kv_cache_during_the_update(engine, qwen3_path, tmp_path):
    engine.release_memory(weights="discard")
    engine.resume_memory(["weights"])
    seen = [engine.memory_stats()]
    model = trained(qwen3_path, 3)
    model.save_pretrained(tmp_path / "step")
    engine.begin_weight_update(None, checkpoint_manifest(tmp_path / "step"))
    for name, tensor in iter_checkpoint(tmp_path / "step"):
        engine.load_weights([(name, tensor)])
        seen.append(engine.memory_stats())
    engine.commit_weight_update()
    seen.append(engine.memory_stats())
    assert all(s["kv_cache"] == 0 and s["released"]["kv_cache"] > 0 for s in seen)
    assert all(s["weights"] > 0 for s in seen)
    engine.resume_memory(["kv_cache"])
    assert_matches(model, PROMPTS, outputs(engine, SamplingParams(temperature=0, max_tokens=6)))
