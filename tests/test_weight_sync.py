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
    endpoint, token = weight_sync.split_address(address)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)

    def request(header: dict) -> dict:
        sock.send_multipart([b"", msgpack.packb({**header, "token": token})])
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


def _trainer_in_thread(port: int, named: list, box: dict) -> threading.Thread:
    def run():
        try:
            group = weight_sync.WeightUpdateGroup("127.0.0.1", port, 0, 2, "sync", "gloo",
                                                  timeout_s=60)
            group.send(named, bucket_bytes=1 << 16)
            box["sent"] = True
        except Exception as e:
            box["error"] = e
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_gloo_update_that_cannot_be_followed_closes_the_group(engine, qwen3_path):
    """A manifest the engine cannot size (an unknown dtype) means it cannot take the broadcast:
    the group is closed at once (the trainer's send fails, not hangs, and no later update
    can take this one's bytes), and a new group updates as usual."""
    named = list(trained(qwen3_path, 17).named_parameters())
    names, shapes = [n for n, _ in named], [list(t.shape) for _, t in named]
    port, box = free_port(), {}
    trainer = _trainer_in_thread(port, named, box)
    engine.init_weights_update_group("127.0.0.1", port, 1, 2, "sync")
    with pytest.raises(ValueError, match="unknown dtype 'float33'.*group 'sync' is closed"):
        engine.update_weights_from_distributed(names, ["float33"] * len(names), shapes, "sync")
    trainer.join(timeout=20)
    assert not trainer.is_alive() and "error" in box
    assert engine.weight_version == 0
    model = trained(qwen3_path, 18)
    named = list(model.named_parameters())
    port, box = free_port(), {}
    trainer = _trainer_in_thread(port, named, box)
    engine.init_weights_update_group("127.0.0.1", port, 1, 2, "sync")
    assert engine.update_weights_from_distributed(names, ["float32"] * len(names), shapes,
                                                  "sync", version=5, bucket_bytes=1 << 16) == 5
    trainer.join(timeout=20)
    assert box == {"sent": True}
    assert engine.weights_checksum() == weight_sync.checksum(named)


def test_a_malformed_zmq_message_is_answered_and_the_receiver_keeps_serving(engine, qwen3_path):
    import msgpack
    import zmq
    address = engine.start_weight_receiver("tcp://127.0.0.1:0")
    endpoint, token = weight_sync.split_address(address)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        model = trained(qwen3_path, 19)
        named = dict(model.named_parameters())
        opening = {"op": "begin", "version": 4, "token": token,
                   "manifest": [weight_sync.TensorMeta.of(n, t).to_wire()
                                for n, t in named.items()]}
        for frames, error in [([b"", msgpack.packb(opening)], None),  # an update left open
                              ([b"x"], "got 1 frame"), ([b"", b"\xc1"], "header is not msgpack"),
                              ([b"", msgpack.packb([1])], "must be a msgpack map")]:
            sock.send_multipart(frames)
            assert sock.poll(10_000)
            reply = msgpack.unpackb(sock.recv_multipart()[-1])
            assert reply["ok"] if error is None else error in reply["error"]
    finally:
        sock.close()
        ctx.term()
    with weight_sync.ZmqWeightSender(address, bucket_bytes=1 << 16) as sender:
        assert sender.send(named.items(), version=4) == 4
    assert_matches(model, PROMPTS, generated(engine))


def test_a_zmq_peer_without_the_receivers_token_is_refused_and_changes_nothing(engine,
                                                                              qwen3_path):
    """The receiver's port may be reachable by others (a node's address, for Ray): only a
    sender given the address it reported, token included, is heard; a stranger's update neither
    lands nor aborts the trainer's open one."""
    address = engine.start_weight_receiver("tcp://127.0.0.1:0")
    endpoint, token = weight_sync.split_address(address)
    assert len(token) == 32
    before, version = engine.weights_checksum(), engine.weight_version
    named = {n: t.detach() for n, t in trained(qwen3_path, 21).named_parameters()}
    other = {n: t.detach() for n, t in trained(qwen3_path, 22).named_parameters()}
    refused = "does not carry this receiver's token"
    for guess in (endpoint, f"{endpoint}#token={'0' * 32}"):
        with weight_sync.ZmqWeightSender(guess, bucket_bytes=1 << 16) as stranger:
            with pytest.raises(weight_sync.WeightUpdateError, match=refused):
                stranger.send(other.items(), version=66)
    assert engine.weights_checksum() == before and engine.weight_version == version
    with weight_sync.ZmqWeightSender(address, bucket_bytes=1 << 16) as sender:
        buckets = sender.begin(named, 5)
        sender.send_bucket(named, buckets[0])
        with weight_sync.ZmqWeightSender(endpoint, bucket_bytes=1 << 16) as stranger:
            with pytest.raises(weight_sync.WeightUpdateError, match=refused):
                stranger.begin(other, 66)
        for bucket in buckets[1:]:
            sender.send_bucket(named, bucket)
        assert sender.commit() == 5
    assert engine.weights_checksum() == weight_sync.checksum(named.items())


def test_a_tensor_unlike_its_manifest_is_refused_before_it_lands(engine):
    before = engine.weights_checksum()
    name, shape = "model.norm.weight", (128,)
    metas = [weight_sync.TensorMeta(name, "float32", shape)]
    for tensors, message in [
            ([(name, torch.ones(shape, dtype=torch.int32))],
             "int32 \\[128\\] arrived, the manifest said float32 \\[128\\]"),
            (weight_sync.buckets.unpack(torch.zeros(256, dtype=torch.uint8), metas),
             "a bucket of 256 bytes cannot hold its tensors \\(512 bytes")]:
        engine.begin_weight_update(1, metas)
        with pytest.raises(ValueError, match=message):
            engine.load_weights(tensors)
        engine.abort_weight_update("refused")
        assert engine.weights_checksum() == before and engine.weights.broken is None
    assert engine.generate([[1, 2]], GREEDY, use_tqdm=False)[0].outputs[0].weight_version == 0


def test_tied_embedding_written_by_either_name_counts_once(checkpoints):
    """A broken update that wrote the tied lm_head (the embedding) is repaired by an update
    naming the embedding, and discarded weights by one naming lm_head."""
    engine = Engine(str(checkpoints("llama-tied")), num_kv_blocks=64)
    model = trained(checkpoints("llama-tied"), 20)
    named = dict(model.named_parameters())
    alias = {("lm_head.weight" if n == "model.embed_tokens.weight" else n): t
             for n, t in named.items()}
    engine.begin_weight_update(1, [weight_sync.TensorMeta.of("lm_head.weight",
                                                             named["model.embed_tokens.weight"])])
    engine.load_weights([("lm_head.weight", named["model.embed_tokens.weight"] * 0)])
    engine.abort_weight_update("the sender died")
    assert engine.update_weights(named.items(), version=2) == 2
    engine.release_memory(weights="discard")
    engine.resume_memory()
    assert engine.update_weights(alias.items(), version=3) == 3
    assert engine.weights_checksum() == weight_sync.checksum(named.items())


def test_release_is_refused_inside_an_update_and_a_refused_update_leaves_memory_released(
        engine):
    metas = [weight_sync.TensorMeta("model.norm.weight", "float32", (128,))]
    engine.begin_weight_update(1, metas)
    with pytest.raises(RuntimeError, match="an update to weight version 1 is open"):
        engine.release_memory()
    engine.abort_weight_update("done")
    engine.release_memory()
    with pytest.raises(ValueError, match="must be an int or a non-empty string"):
        engine.begin_weight_update(1.5, metas)
    assert engine.memory_stats()["weights"] == 0
    engine.resume_memory()
    assert engine.generate([[1, 2]], GREEDY, use_tqdm=False)[0].outputs[0].weight_version == 0


def test_a_handle_pickle_may_not_set_attributes_of_torch_classes():
    """Naming only allowed classes, a pickle's BUILD op would set attributes on the class
    itself (here: the method torch's file_system sharing calls), for the whole process."""
    from weight_sync import safe_pickle
    method = torch.UntypedStorage._new_shared_filename_cpu
    attack = (b"\x80\x02ctorch.storage\nUntypedStorage\n"
              b"N}X\x18\x00\x00\x00_new_shared_filename_cpuNs\x86b.")
    with pytest.raises(Exception, match="refused to set attributes of UntypedStorage"):
        safe_pickle.loads(attack)
    assert torch.UntypedStorage._new_shared_filename_cpu is method


def test_a_handle_pickle_may_call_only_torchs_rebuild_functions():
    """torch.Tensor is a name a handle holds (an argument of rebuild_tensor); called on a nested
    list of one list repeated, it built 2^depth elements under the GIL from a few hundred bytes
    (a server froze 25 s at depth 26). Calls and instantiations of it are refused; handles
    still load."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from weight_sync import safe_pickle

    class Bomb:
        def __reduce__(self):
            nested = [1.0]
            for _ in range(12):  # 2^12 elements here (a few bytes more per doubling)
                nested = [nested, nested]
            return torch.Tensor, (nested,)

    with pytest.raises(pickle.UnpicklingError, match="refused to call Tensor"):
        safe_pickle.loads(pickle.dumps(Bomb(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refused to call Tensor"):
        safe_pickle.loads(b"\x80\x02ctorch\nTensor\n)\x81.")  # NEWOBJ
    with pytest.raises(pickle.UnpicklingError, match="refused to call Tensor"):
        safe_pickle.loads(b"(ctorch\nTensor\nK\x01o.")  # OBJ (protocol 1)
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        buf = io.BytesIO()
        weights = [("w", torch.arange(6.0).reshape(2, 3)), ("p", torch.nn.Parameter(torch.ones(2)))]
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(weights)
        got = safe_pickle.loads(buf.getvalue())
    finally:
        torch.multiprocessing.set_sharing_strategy(before)
    assert [n for n, _ in got] == ["w", "p"] and torch.equal(got[0][1], weights[0][1])


def test_an_untied_checkpoint_without_its_embedding_is_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    src = Path(checkpoints("llama-untied"))
    dst = tmp_path / "no-embedding"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 tensors the model needs: "
                                         "\\['model.embed_tokens.weight'\\]"):
        Engine(str(dst), num_kv_blocks=16)


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


def test_a_second_zmq_senders_begin_ends_the_first_ones_update_and_refuses_its_buckets(
        engine, qwen3_path):
    """Two senders on one receiver (a restarted trainer, or two by mistake): the second's begin
    aborts the first's open update, and the first's later buckets and commit are refused;
    they were taken into the second's update, which committed a mix under its version."""
    first = {n: t.detach() for n, t in trained(qwen3_path, 21).named_parameters()}
    second = {n: t.detach() for n, t in trained(qwen3_path, 22).named_parameters()}
    address = engine.start_weight_receiver("tcp://127.0.0.1:0")
    with (weight_sync.ZmqWeightSender(address, bucket_bytes=1 << 16) as a,
          weight_sync.ZmqWeightSender(address, bucket_bytes=1 << 16) as b):
        plan_a = a.begin(first, version=10)
        a.send_bucket(first, plan_a[0])
        a._reply()  # the first bucket landed
        plan_b = b.begin(second, version=20)
        for metas in plan_b:
            b.send_bucket(second, metas)
        with pytest.raises(weight_sync.WeightUpdateError, match="begun by another sender"):
            a.send_bucket(first, plan_a[1])
            a._reply()
        assert b.commit() == 20
        with pytest.raises(weight_sync.WeightUpdateError, match="another sender|outside"):
            a.commit()
    assert engine.weights_checksum() == weight_sync.checksum(second.items())


def test_the_zmq_silence_timeout_counts_from_the_receivers_answer(engine, qwen3_path):
    """A begin that waits behind a long engine step is not the sender's silence: the update
    stays open for timeout_s after the answer (it was counted from the message's arrival)."""
    named = {n: t.detach() for n, t in trained(qwen3_path, 23).named_parameters()}
    address = engine.start_weight_receiver("tcp://127.0.0.1:0", timeout_s=1.0)
    with weight_sync.ZmqWeightSender(address, bucket_bytes=1 << 16) as sender:
        box: list = []
        with engine._cond:  # held as a step holds it, for longer than the timeout
            begun = threading.Thread(target=lambda: box.append(sender.begin(named, 30)))
            begun.start()
            time.sleep(1.5)
        begun.join(timeout=30)
        time.sleep(0.3)
        for metas in box[0]:
            sender.send_bucket(named, metas)
        assert sender.commit() == 30


def test_gloo_manifest_entries_of_the_wrong_type_close_the_group_and_name_the_entry(
        engine, qwen3_path):
    """A shape that is not a list raised TypeError past the handler that closes the group; the
    next update then took this one's broadcast and committed the wrong weights."""
    first = list(trained(qwen3_path, 24).named_parameters())
    names, shapes = [n for n, _ in first], [list(t.shape) for _, t in first]
    port, box = free_port(), {}
    trainer = _trainer_in_thread(port, first, box)
    engine.init_weights_update_group("127.0.0.1", port, 1, 2, "sync")
    with pytest.raises(ValueError, match=f"{names[0]}: shape 7 is not a list.*'sync' is closed"):
        engine.update_weights_from_distributed(names, ["float32"] * len(names),
                                               [7] + shapes[1:], "sync")
    trainer.join(timeout=120)
    assert not trainer.is_alive() and "error" in box
    second = list(trained(qwen3_path, 25).named_parameters())
    port, box = free_port(), {}
    trainer = _trainer_in_thread(port, second, box)
    engine.init_weights_update_group("127.0.0.1", port, 1, 2, "sync")
    engine.update_weights_from_distributed(names, ["torch.float32"] * len(names), shapes,
                                           "sync", bucket_bytes=1 << 16)  # torch's spelling
    trainer.join(timeout=20)
    assert box == {"sent": True}
    assert engine.weights_checksum() == weight_sync.checksum(second)


def test_tied_names_with_different_values_are_refused(checkpoints):
    """lm_head.weight and the embedding are one tensor of a tied model: both given with
    different values (an untied trainer's, or checkpoint's) was taken silently, the last
    one winning; equal values (a tied trainer's state_dict) load."""
    path = checkpoints("llama-tied")
    engine = Engine(str(path), num_kv_blocks=64)
    model = trained(path, 26)
    state = dict(model.state_dict())
    assert "lm_head.weight" in state
    assert engine.update_weights(state.items(), version=1) == 1
    untied = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
    with pytest.raises(ValueError, match="one tensor in this model .*different values"):
        engine.update_weights(untied.items(), version=2)
    with pytest.raises(IncompleteWeightsError):
        generated(engine)
    assert engine.update_weights(state.items(), version=3) == 3
    assert engine.weights_checksum() == weight_sync.checksum(model.named_parameters())
    with_nan = {**state, "model.embed_tokens.weight": state["lm_head.weight"].clone()}
    with_nan["model.embed_tokens.weight"][0, 0] = with_nan["lm_head.weight"][0, 0] = float("nan")
    assert engine.update_weights(with_nan.items(), version=4) == 4  # the same bits: one tensor


def test_refused_messages_do_not_keep_an_abandoned_update_open(engine, qwen3_path):
    """Only the open update's sender restarts its silence clock: a peer without the token
    sending every 0.3 s kept a dead trainer's update open, and the engine from stepping."""
    named = {n: t.detach() for n, t in trained(qwen3_path, 27).named_parameters()}
    address = engine.start_weight_receiver("tcp://127.0.0.1:0", timeout_s=1.0)
    endpoint, _ = weight_sync.split_address(address)
    with (weight_sync.ZmqWeightSender(address) as abandoned,
          weight_sync.ZmqWeightSender(endpoint, timeout_s=5) as stranger):
        abandoned.begin(named, version=9)  # and then nothing
        started = time.monotonic()
        while engine.weights.txn is not None:
            assert time.monotonic() - started < 5, "the abandoned update is still open"
            with pytest.raises(weight_sync.WeightUpdateError, match="token"):
                stranger.begin({"x": torch.zeros(1)})
            time.sleep(0.3)
    assert engine.weight_version == 0 and generated(engine)


def test_a_sender_whose_connection_drops_and_comes_back_keeps_its_update(engine, qwen3_path):
    """ZMQ reconnects a dropped TCP connection by itself; the receiver took the reconnected
    sender for another one and refused the rest of its update."""
    named = {n: t.detach() for n, t in trained(qwen3_path, 28).named_parameters()}
    address = engine.start_weight_receiver("tcp://127.0.0.1:0")
    endpoint, token = weight_sync.split_address(address)
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    with weight_sync.ZmqWeightSender(f"tcp://127.0.0.1:{relay.port}#token={token}",
                                     bucket_bytes=1 << 16, timeout_s=30) as sender:
        plan = sender.begin(named, version=11)
        relay.drop()
        for metas in plan:
            sender.send_bucket(named, metas)
        assert sender.commit() == 11
    assert relay.connections == 2
    assert engine.weights_checksum() == weight_sync.checksum(named.items())


class Relay:
    """A TCP relay to a local port whose connections can be dropped (both ends see them
    closed), as a network blip or an idle timeout drops them."""

    def __init__(self, target: int):
        self.target, self.live, self.connections = target, [], 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.live.append((client, upstream))
            self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        for end in (a, b):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self) -> None:
        for pair in self.live:
            for end in pair:
                end.shutdown(socket.SHUT_RDWR)
        self.live.clear()
        time.sleep(0.5)  # ZMQ reconnects after 100 ms
