"""What the Ray and verl tests share: a local engine run with the thread count of the engine
actors, and outputs compared field by field except the request id (engines number their own)."""

import dataclasses
from contextlib import contextmanager

import torch

from rollout import Engine, RequestOutput

ENGINE_OPTIONS = dict(num_kv_blocks=64)  # every engine of these tests, local or in an actor


@contextmanager
def torch_threads(n: int):
    """On the CPU, BLAS results depend on the thread count: a local reference engine runs with
    the count the actors use (1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def local_generate(path, prompts, params, weights=None, version=None) -> list[RequestOutput]:
    with torch_threads(1):
        engine = Engine(str(path), **ENGINE_OPTIONS)
        if weights is not None:
            engine.update_weights(weights, version=version)
        return engine.generate(prompts, params, use_tqdm=False)


def comparable(outputs: list[RequestOutput]) -> list[dict]:
    return [{**dataclasses.asdict(o), "request_id": None} for o in outputs]


def samples(outputs: list[RequestOutput]) -> list[list[tuple]]:
    """What was sampled, leaving out prefix-cache hits (they depend on what ran before)."""
    return [[(c.token_ids, c.logprobs, c.finish_reason, c.seed, c.weight_versions)
             for c in o.outputs] for o in outputs]
