"""Contract 2: weights are updated in place, versioned and transactionally, through every
transport; generation control around updates."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import weight_sync
from rollout import Engine, SamplingParams
from rollout.weights import IncompleteWeightsError
from tests.peers import trained

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [[1, 2, 3, 4], [100, 200, 300, 400, 500, 7, 8], [42] * 40]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def peer(role: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.peers", role, json.dumps(kwargs)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1)


def assert_matches(model, prompts, outputs) -> None:
    """Same check as the engine-core parity test: argmax and log-probs within 1e-4."""
    for prompt, (tokens, logprobs) in zip(prompts, outputs):
        ref = reference(model, prompt, tokens)
        for i, t in enumerate(tokens):
            top2 = ref[i].topk(2).values
            if top2[0] - top2[1] >= 1e-4:
                assert ref[i].argmax().item() == t
            assert abs(ref[i, t].item() - logprobs[i]) <= 1e-4


def generated(engine) -> list:
    return [[o.outputs[0].token_ids, o.outputs[0].logprobs]
            for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def pointers(engine) -> list[int]:
    return [p.data_ptr() for p in engine.runner.model.parameters()]


@pytest.fixture
def engine(qwen3_path):
    return Engine(str(qwen3_path), num_kv_blocks=64)


def test_in_process_update_named_tensors_and_buckets(engine, qwen3_path):
    before = pointers(engine)
    for seed, as_buckets in ((1, False), (2, True)):
        model = trained(qwen3_path, seed)
        named = list(model.named_parameters())
        payload = weight_sync.make_buckets(named, bucket_bytes=1 << 16) if as_buckets else named
        version = engine.update_weights(payload)
        assert version == engine.weight_version == seed
        assert engine.weights_checksum() == weight_sync.checksum(named)
        assert pointers(engine) == before
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert {o.outputs[0].weight_version for o in outs} == {seed}
        assert_matches(model, PROMPTS, [[o.outputs[0].token_ids, o.outputs[0].logprobs]
                                        for o in outs])


def test_tied_embeddings_update_through_the_embedding(checkpoints):
    path = checkpoints("llama-tied")
    engine = Engine(str(path), num_kv_blocks=64)
    model = trained(path, 14)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # a tied model lists the shared tensor once
    engine.update_weights(model.named_parameters())
    assert engine.weights_checksum() == weight_sync.checksum(model.named_parameters())
    assert_matches(model, PROMPTS, generated(engine))


def test_float32_trainer_into_bfloat16_engine(qwen3_path):
    engine = Engine(str(qwen3_path), dtype="bfloat16", num_kv_blocks=64)
    before = pointers(engine)
    model = trained(qwen3_path, 3)
    engine.update_weights(model.named_parameters())
    assert pointers(engine) == before
    assert engine.weights_checksum() == weight_sync.checksum(model.named_parameters(),
                                                             dtype=torch.bfloat16)
    assert engine.weights_checksum() != weight_sync.checksum(model.named_parameters())


@pytest.mark.parametrize("mode, share", [("bytes", False), ("handle", False), ("handle", True)])
def test_zmq_update_from_a_trainer_process(engine, qwen3_path, mode, share):
    before = pointers(engine)
    address = engine.start_weight_receiver("tcp://127.0.0.1:0")
    result = finish(peer("zmq_sender", address=address, mode=mode, path=str(qwen3_path), seed=4,
                         bucket_bytes=1 << 16, version=7, share=share))
    assert result["version"] == engine.weight_version == 7
    model = trained(qwen3_path, 4)
    assert engine.weights_checksum() == weight_sync.checksum(model.named_parameters())
    assert pointers(engine) == before
    assert_matches(model, PROMPTS, generated(engine))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_zmq_update_from_a_gpu_trainer_by_cuda_ipc_handles(engine, qwen3_path):
    address = engine.start_weight_receiver("tcp://127.0.0.1:0")
    result = finish(peer("zmq_sender", address=address, mode="handle", path=str(qwen3_path),
                         seed=9, bucket_bytes=1 << 16, version=9, device="cuda"))
    assert result["version"] == engine.weight_version == 9
    model = trained(qwen3_path, 9)
    assert engine.weights_checksum() == weight_sync.checksum(model.named_parameters())
    assert_matches(model, PROMPTS, generated(engine))


class RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_cuda_ipc_handle_that_would_run_code_is_refused(engine, qwen3_path, tmp_path):
    import pickle

    import msgpack
    import zmq
    before = engine.weights_checksum()
    address = engine.start_weight_receiver("tcp://127.0.0.1:0")
    named = list(trained(qwen3_path, 1).named_parameters())
    metas = [weight_sync.TensorMeta.of(n, t) for n, t in named]
    marker = tmp_path / "ran"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)

    def request(header: dict) -> dict:
        sock.send_multipart([b"", msgpack.packb(header)])
        assert sock.poll(30_000)
        return msgpack.unpackb(sock.recv_multipart()[1])

    try:
        manifest = [m.to_wire() for m in metas]
        assert request({"op": "begin", "version": 5, "manifest": manifest})["ok"]
        reply = request({"op": "bucket", "tensors": [metas[0].to_wire()],
                         "nbytes": metas[0].nbytes,
                         "cuda_ipc": pickle.dumps((RunsCode(f"touch {marker}"), ()))})
    finally:
        sock.close()
    assert not reply["ok"] and "refused posix.system" in reply["error"], reply
    assert not marker.exists()
    assert engine.weights_checksum() == before and engine.weight_version == 0
    assert engine.generate([[1, 2]], GREEDY, use_tqdm=False)[0].outputs[0].weight_version == 0


def test_gloo_group_one_trainer_two_engines(qwen3_path):
    model = trained(qwen3_path, 5)
    named = list(model.named_parameters())
    manifest = [[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in named]
    port = free_port()
    engines = [peer("engine_rank", path=str(qwen3_path), master_port=port, rank=rank,
                    world_size=3, manifest=manifest, prompts=PROMPTS, version=3)
               for rank in (1, 2)]
    group = weight_sync.WeightUpdateGroup("127.0.0.1", port, 0, 3, "sync", "gloo")
    group.send(named, bucket_bytes=1 << 16)
    results = [finish(p) for p in engines]
    for result in results:
        assert result["version"] == 3 and result["ptrs_unchanged"]
        assert result["checksum"] == weight_sync.checksum(named)
        assert_matches(model, PROMPTS, result["outputs"])
    assert results[0]["outputs"] == results[1]["outputs"]


def test_update_from_disk(engine, qwen3_path, tmp_path):
    before = pointers(engine)
    model = trained(qwen3_path, 6)
    model.save_pretrained(tmp_path / "step-6")
    assert engine.update_weights_from_disk(str(tmp_path / "step-6"), version=6) == 6
    assert engine.weights_checksum() == weight_sync.checksum(model.named_parameters())
    assert pointers(engine) == before
    assert_matches(model, PROMPTS, generated(engine))


def test_refused_manifest_names_every_bad_tensor_and_changes_nothing(engine):
    before = engine.weights_checksum()
    bad = [("model.layers.0.self_attn.q_proj.weight", torch.zeros(3, 3)),
           ("model.layers.1.mlp.up_proj.weight", torch.zeros(256, 128)),  # fine
           ("model.not_a_layer.weight", torch.zeros(4)),
           ("model.norm.weight", torch.zeros(128, dtype=torch.int64)),
           ("lm_head.weight", torch.zeros(512, 64))]
    with pytest.raises(ValueError) as err:
        engine.update_weights(bad)
    message = str(err.value)
    for name in ("q_proj.weight: shape (3, 3)", "model.not_a_layer.weight: not a parameter",
                 "model.norm.weight: dtype int64", "lm_head.weight: shape (512, 64)"):
        assert name in message
    assert "up_proj" not in message and "4 problem(s)" in message
    assert engine.weights_checksum() == before and engine.weight_version == 0
    assert engine.generate([[1, 2]], GREEDY, use_tqdm=False)[0].outputs[0].weight_version == 0


def test_killed_sender_leaves_weights_incomplete_until_a_complete_update(qwen3_path):
    engine = Engine(str(qwen3_path), num_kv_blocks=64)
    address = engine.start_weight_receiver("tcp://127.0.0.1:0", timeout_s=1.0)
    sender = peer("zmq_sender", address=address, mode="bytes", path=str(qwen3_path), seed=8,
                  bucket_bytes=1 << 16, version=8, die_after_buckets=3)
    sender.wait(timeout=120)
    assert sender.returncode == -9
    deadline = time.monotonic() + 30
    while engine.weights.broken is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(IncompleteWeightsError, match="update to version 8 broke"):
        engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    result = finish(peer("zmq_sender", address=address, mode="bytes", path=str(qwen3_path),
                         seed=9, bucket_bytes=1 << 16, version=9))
    assert result["version"] == 9
    assert_matches(trained(qwen3_path, 9), PROMPTS, generated(engine))


def run_in_background(engine, prompts, params):
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=engine.generate(prompts, params,
                                                                           use_tqdm=False)))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until every request has made some tokens
        seqs = [s for r in list(engine._requests.values()) for s in r.seqs]
        if len(seqs) == len(prompts) and all(s.num_output_tokens >= 3 for s in seqs):
            break
        time.sleep(0.002)
    return thread, box


LONG = SamplingParams(temperature=1.0, seed=11, max_tokens=300, ignore_eos=True)


def test_retract_with_unchanged_weights_matches_an_uninterrupted_run(engine):
    expected = engine.generate(PROMPTS, LONG, use_tqdm=False)
    thread, box = run_in_background(engine, PROMPTS, LONG)
    engine.pause_generation("retract")
    assert not engine.scheduler.running and engine.block_manager.num_free_blocks == 64
    engine.continue_generation()
    thread.join(timeout=120)
    for got, want in zip(box["out"], expected):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].logprobs == want.outputs[0].logprobs


def test_abort_returns_partial_tokens_with_logprobs(engine):
    expected = engine.generate(PROMPTS, LONG, use_tqdm=False)
    thread, box = run_in_background(engine, PROMPTS, LONG)
    engine.pause_generation("abort")
    thread.join(timeout=60)
    engine.continue_generation()
    for got, want in zip(box["out"], expected):
        c = got.outputs[0]
        assert c.finish_reason == "abort" and 3 <= len(c.token_ids) < 300
        assert len(c.logprobs) == len(c.token_ids)
        assert c.token_ids == want.outputs[0].token_ids[:len(c.token_ids)]
        assert c.logprobs == want.outputs[0].logprobs[:len(c.token_ids)]


def test_in_place_pause_then_update_says_the_weights_were_mixed(engine, qwen3_path):
    thread, box = run_in_background(engine, PROMPTS, LONG)
    engine.pause_generation("in_place")
    engine.update_weights(trained(qwen3_path, 12).named_parameters())
    engine.continue_generation()
    thread.join(timeout=120)
    for out in box["out"]:
        assert out.outputs[0].weight_versions == [0, 1] and out.outputs[0].weight_version == 1
    # their K/V mixed two versions: none of it may serve a later request
    again = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert all(o.outputs[0].cached_tokens == 0 for o in again)


def test_update_between_prefill_chunks_of_a_group(qwen3_path):
    """An update lands after the first chunk of an n=2 group's prompt: both samples say their
    K/V mixed two versions, and none of it (the parent's blocks, which the sibling shares) may
    serve a later request."""
    engine = Engine(str(qwen3_path), num_kv_blocks=64, block_size=16,
                    max_num_batched_tokens=32)
    prompt = list(range(10, 110))
    engine.pause_generation("in_place")
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=engine.generate(
        [prompt], SamplingParams(temperature=0, n=2, max_tokens=4, ignore_eos=True),
        use_tqdm=False)))
    thread.start()
    while not engine.scheduler.has_work():
        time.sleep(0.002)
    engine.step()  # the prompt's first 32 tokens, at version 0
    model = trained(qwen3_path, 14)
    engine.update_weights(model.named_parameters())
    engine.continue_generation()
    thread.join(timeout=120)
    assert [c.weight_versions for c in box["out"][0].outputs] == [[0, 1], [0, 1]]
    again = engine.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert again.cached_tokens == 0
    assert_matches(model, [prompt], [[again.token_ids, again.logprobs]])


def test_update_drops_prefix_cache_entries_of_older_weights(engine, qwen3_path):
    prompt = list(range(50, 120))
    engine.generate([prompt], GREEDY, use_tqdm=False)
    assert engine.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].cached_tokens > 0
    model = trained(qwen3_path, 13)
    engine.update_weights(model.named_parameters())
    out = engine.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.cached_tokens == 0
    assert_matches(model, [prompt], [[out.token_ids, out.logprobs]])


def test_string_weight_versions(engine, qwen3_path):
    """SGLang and slime name versions with strings; outputs carry them as given."""
    named = list(trained(qwen3_path, 15).named_parameters())
    assert engine.update_weights(named, version="step-15") == "step-15"
    assert {o.outputs[0].weight_version for o in engine.generate(PROMPTS, GREEDY,
                                                                 use_tqdm=False)} == {"step-15"}
    before = engine.weights_checksum()
    with pytest.raises(ValueError, match="version 'step-15', a string: give the update its"):
        engine.update_weights(list(trained(qwen3_path, 16).named_parameters()))
    assert engine.weights_checksum() == before and engine.weight_version == "step-15"
    engine.weights.relabel("step-15b")
    assert engine.generate([[1, 2]], GREEDY, use_tqdm=False)[0].outputs[0].weight_version == \
        "step-15b"
    assert engine.update_weights(named, version=16) == 16
    assert engine.update_weights(named) == 17
