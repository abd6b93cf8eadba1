"""Trainer-side processes for `rollout bench weight-sync`: each loads the checkpoint's tensors
as a float32 trainer would hold them, pushes them once and prints the seconds it took.
Run as `python -m rollout.bench_peers ROLE JSON_ARGS`."""

import json
import sys
import time

import torch


def trainer_weights(path: str) -> dict[str, torch.Tensor]:
    from rollout.loader import iter_checkpoint
    return {name: t.to(torch.float32) for name, t in iter_checkpoint(path)}


def zmq(address: str, mode: str, path: str, bucket_bytes: int, repeats: int,
        share: bool = False) -> None:
    """Send `repeats` times with one sender, as a trainer does every step; seconds of each."""
    from weight_sync import ZmqWeightSender
    named = trainer_weights(path)
    seconds = []
    with ZmqWeightSender(address, mode=mode, bucket_bytes=bucket_bytes) as sender:
        if share:
            sender.share(named.items())
        for _ in range(repeats):
            start = time.perf_counter()
            sender.send(named.items())
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds}), flush=True)


def gloo(port: int, path: str, bucket_bytes: int, repeats: int) -> None:
    from weight_sync import WeightUpdateGroup
    named = trainer_weights(path)
    group = WeightUpdateGroup("127.0.0.1", port, 0, 2, "bench", "gloo")
    for _ in range(repeats):
        group.send(named.items(), bucket_bytes)
    print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    globals()[sys.argv[1]](**json.loads(sys.argv[2]))
