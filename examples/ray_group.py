"""A group of rollout engines on Ray: sample, train a step, push the new weights to every engine
through one collective group (the trainer is rank 0, engine i is rank i + 1), then give the
engines' memory back and take it again. Runs on the CPU with the small built-in preset:

    pip install -e ".[ray]"
    python examples/ray_group.py

On a cluster, start Ray there and pass --address auto; --placement SPREAD puts the engines on
different nodes.
"""

import argparse
import socket

import ray
import torch
import transformers

import weight_sync
from integrations.ray import RolloutGroup
from rollout import SamplingParams
from rollout.presets import preset_path


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def push_weights(group: RolloutGroup, model: torch.nn.Module, version: int) -> list[int]:
    """The trainer (this process) broadcasts to the engines over gloo (NCCL on GPUs)."""
    address = ray.util.get_node_ip_address()
    port = free_port(address)
    joined = group.init_weights_update_group(address, port, "sync", backend="gloo", wait=False)
    trainer = weight_sync.WeightUpdateGroup(address, port, 0, group.size + 1, "sync", "gloo")
    joined.result()
    named = list(model.named_parameters())
    names, dtypes, shapes = zip(*[(n, str(t.dtype)[6:], list(t.shape)) for n, t in named])
    received = group.update_weights_from_distributed(list(names), list(dtypes), list(shapes),
                                                     "sync", version=version, wait=False)
    trainer.send(named)
    versions = received.result()
    group.destroy_weights_update_group("sync")
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: small preset)")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD"])
    parser.add_argument("--address", default=None, help="a running Ray cluster ('auto')")
    args = parser.parse_args()
    path = args.model or str(preset_path("qwen3-tiny-random"))
    ray.init(address=args.address, num_cpus=None if args.address else args.engines,
             include_dashboard=False)

    group = RolloutGroup(path, args.engines, args.placement)
    prompts = [[1, 2, 3, 4, 5, 6], [40, 41, 42], "Hello", [7] * 12]
    params = SamplingParams(temperature=1.0, n=4, max_tokens=16, seed=1)
    outputs = group.generate(prompts, params)
    print(f"sampled {sum(len(o.outputs) for o in outputs)} completions of {len(prompts)} prompts "
          f"on {group.size} engines (per engine: {[s.completed for s in group.slots]} prompts)")

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # stands in for a training step
        for p in model.parameters():
            p.mul_(0.99)
    versions = push_weights(group, model, version=1)
    same = set(group.weights_checksum()) == {weight_sync.checksum(model.named_parameters())}
    print(f"weight versions {versions}, every engine's checksum equals the trainer's: {same}")

    before = group.generate(prompts, params)
    group.release_memory()  # e.g. while the trainer uses the device
    group.resume_memory()
    after = group.generate(prompts, params)
    unchanged = all(a.outputs[i].token_ids == b.outputs[i].token_ids and
                    a.outputs[i].logprobs == b.outputs[i].logprobs
                    for a, b in zip(after, before) for i in range(params.n))
    print(f"released and resumed {group.size} engines; outputs unchanged: {unchanged}")
    group.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
