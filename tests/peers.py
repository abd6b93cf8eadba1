"""Processes the weight-sync tests start: trainers that send (over ZMQ, and can die midway, or
as rank 0 of a collective group), engine ranks of a collective group, and trainers that update a
`rollout serve` over HTTP the way slime updates SGLang. Run as
`python -m tests.peers ROLE JSON_ARGS`."""

import base64
import dataclasses
import io
import json
import os
import signal
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import torch
import transformers


def trained(path: str, seed: int):
    """The checkpoint's model after a deterministic 'training step'."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def zmq_sender(address: str, mode: str, path: str, seed: int, bucket_bytes: int,
               version: int | None = None, die_after_buckets: int | None = None,
               share: bool = False, device: str = "cpu") -> None:
    from weight_sync import ZmqWeightSender
    model = trained(path, seed).to(device)
    sender = ZmqWeightSender(address, mode=mode, bucket_bytes=bucket_bytes)
    named = dict(model.named_parameters())
    if share:
        before = {n: id(p) for n, p in named.items()}
        sender.share(named.items())
        assert before == {n: id(p) for n, p in model.named_parameters()}
    plan = sender.begin(named, version)
    for i, metas in enumerate(plan):
        if die_after_buckets is not None and i == die_after_buckets:
            os.kill(os.getpid(), signal.SIGKILL)
        sender.send_bucket(named, metas)
    print(json.dumps({"version": sender.commit()}), flush=True)
    sender.close()


def engine_rank(path: str, master_port: int, rank: int, world_size: int, manifest: list,
                prompts: list, version: int) -> None:
    from rollout import Engine, SamplingParams
    engine = Engine(path, num_kv_blocks=64)
    ptrs = [p.data_ptr() for p in engine.runner.model.parameters()]
    engine.init_weights_update_group("127.0.0.1", master_port, rank, world_size, "sync", "gloo")
    names, dtypes, shapes = zip(*manifest)
    got = engine.update_weights_from_distributed(list(names), list(dtypes), list(shapes), "sync",
                                                 version=version, bucket_bytes=1 << 16)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                           use_tqdm=False)
    engine.destroy_weights_update_group("sync")
    print(json.dumps({
        "version": got, "checksum": engine.weights_checksum(),
        "ptrs_unchanged": ptrs == [p.data_ptr() for p in engine.runner.model.parameters()],
        "outputs": [[o.outputs[0].token_ids, o.outputs[0].logprobs] for o in outs]}), flush=True)


def collective_trainer(path: str, seed: int, master_port: int, world_size: int,
                       bucket_bytes: int) -> None:
    """Rank 0 of a gloo weight-update group: broadcast the trained model to the engine ranks."""
    from weight_sync import WeightUpdateGroup, checksum
    named = list(trained(path, seed).named_parameters())
    group = WeightUpdateGroup("127.0.0.1", master_port, 0, world_size, "sync", "gloo")
    group.send(named, bucket_bytes=bucket_bytes)
    print(json.dumps({"checksum": checksum(named)}), flush=True)


def sglang_metadata_class() -> type:
    """SGLang's FlattenedTensorMetadata under SGLang's module path (SGLang is not installed
    here), so a pickle of it is what slime sends."""
    @dataclasses.dataclass
    class FlattenedTensorMetadata:
        name: str
        shape: torch.Size
        dtype: torch.dtype
        start_idx: int
        end_idx: int
        numel: int

    path = "sglang.srt.weight_sync.tensor_bucket"
    FlattenedTensorMetadata.__module__ = path
    FlattenedTensorMetadata.__qualname__ = "FlattenedTensorMetadata"
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[path].FlattenedTensorMetadata = FlattenedTensorMetadata
    return FlattenedTensorMetadata


def serialize(obj) -> str:
    """slime's MultiprocessingSerializer.serialize(obj, output_str=True)."""
    from multiprocessing.reduction import ForkingPickler
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


def flattened_bucket(named: list[tuple[str, torch.Tensor]], metadata_class: type) -> dict:
    """SGLang's FlattenedTensorBucket: the tensors' bytes back to back, one uint8 tensor."""
    metadata, start = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        metadata.append(metadata_class(name, t.shape, t.dtype, start, start + nbytes, nbytes))
        start += nbytes
    flat = torch.cat([t.flatten().view(torch.uint8) for _, t in named])
    return {"flattened_tensor": flat, "metadata": metadata}


def chunked(named: list, bucket_bytes: int) -> list[list]:
    chunks, size = [[]], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if chunks[-1] and size + nbytes > bucket_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append((name, t))
        size += nbytes
    return chunks


def tensor_trainer(url: str, path: str, seed: int, version: str, bucket_bytes: int,
                   load_format: str | None = "flattened_bucket") -> None:
    """slime's colocated update: buckets of tensors shared by handle (torch's file_system
    strategy on the CPU), one /update_weights_from_tensor call per bucket."""
    import httpx2
    import torch.multiprocessing
    torch.multiprocessing.set_sharing_strategy("file_system")
    metadata_class = sglang_metadata_class()
    named = [(n, p.detach()) for n, p in trained(path, seed).named_parameters()]
    buckets = chunked(named, bucket_bytes)
    with httpx2.Client(base_url=url, timeout=120, trust_env=False) as client:
        for bucket in buckets:
            payload = flattened_bucket(bucket, metadata_class) if load_format else bucket
            reply = client.post("/update_weights_from_tensor", json={
                "serialized_named_tensors": [serialize(payload)], "load_format": load_format,
                "flush_cache": False, "weight_version": version})
            assert reply.status_code == 200 and reply.json()["success"], reply.text
    print(json.dumps({"buckets": len(buckets)}), flush=True)


def refused_tensor_sender(url: str) -> None:
    """Payloads of tensors shared by handle that the server refuses: a flattened bucket whose
    metadata item is not metadata, and a tensor of no parameter's name."""
    import httpx2
    import torch.multiprocessing
    torch.multiprocessing.set_sharing_strategy("file_system")
    tensor = torch.zeros(4)
    payloads = [({"flattened_tensor": tensor, "metadata": ["x"]}, "flattened_bucket"),
                ([("nope.weight", tensor)], None)]
    with httpx2.Client(base_url=url, timeout=120, trust_env=False) as client:
        statuses = [client.post("/update_weights_from_tensor", json={
            "serialized_named_tensors": [serialize(payload)], "load_format": load_format
        }).status_code for payload, load_format in payloads * 3]
    print(json.dumps({"statuses": statuses}), flush=True)


def slime_group(master_port: int, world_size: int, group_name: str):
    """Trainer rank 0's group as slime makes it: torch's rendezvous at tcp:// and its own
    named-group helper, no default process group."""
    import datetime

    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world,
                                                    rendezvous)
    timeout = datetime.timedelta(seconds=120)
    store, _, _ = next(rendezvous(f"tcp://127.0.0.1:{master_port}", 0, world_size,
                                  timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, 0, [], Backend("gloo"),
                                         PrefixStore(group_name, store), group_name=group_name,
                                         backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def group_trainer(url: str, path: str, seed: int, version: str, master_port: int) -> None:
    """slime's distributed update: the engine joins the group over HTTP while rank 0 builds
    it; then each tensor is broadcast while /update_weights_from_distributed receives it."""
    import httpx2
    import torch.distributed as dist
    named = [(n, p.detach()) for n, p in trained(path, seed).named_parameters()]
    with httpx2.Client(base_url=url, timeout=120, trust_env=False) as client, \
            ThreadPoolExecutor(1) as pool:
        joined = pool.submit(client.post, "/init_weights_update_group", json={
            "master_address": "127.0.0.1", "master_port": master_port, "rank_offset": 1,
            "world_size": 2, "group_name": "slime", "backend": "gloo"})
        group = slime_group(master_port, 2, "slime")
        assert joined.result().status_code == 200, joined.result().text
        updated = pool.submit(client.post, "/update_weights_from_distributed", json={
            "names": [n for n, _ in named], "shapes": [list(t.shape) for _, t in named],
            "dtypes": [str(t.dtype).replace("torch.", "") for _, t in named],
            "group_name": "slime", "flush_cache": False, "weight_version": version})
        for handle in [dist.broadcast(t, 0, group=group, async_op=True) for _, t in named]:
            handle.wait()
        assert updated.result().status_code == 200, updated.result().text
        left = client.post("/destroy_weights_update_group", json={"group_name": "slime"})
        assert left.status_code == 200, left.text
    dist.destroy_process_group(group)
    print(json.dumps({"tensors": len(named)}), flush=True)


if __name__ == "__main__":
    globals()[sys.argv[1]](**json.loads(sys.argv[2]))
