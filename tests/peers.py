"""Processes the weight-sync tests start: trainers that send (over ZMQ, and can die midway, or
as rank 0 of a collective group) and engine ranks of a collective group. Run as
`python -m tests.peers ROLE JSON_ARGS`."""

import json
import os
import signal
import sys

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
               share: bool = False) -> None:
    from weight_sync import ZmqWeightSender
    model = trained(path, seed)
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


if __name__ == "__main__":
    globals()[sys.argv[1]](**json.loads(sys.argv[2]))
