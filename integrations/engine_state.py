"""Read-only views of an engine's state that the integrations need and `Engine` does not offer
as methods yet: how busy it is, and its weights under their checkpoint names."""

import torch

from rollout import Engine
from weight_sync import TensorMeta
from weight_sync.buckets import dtype_name


def load(engine: Engine) -> dict[str, int]:
    """Sequences running and waiting in the engine's scheduler."""
    scheduler = engine.scheduler
    return {"running": len(scheduler.running), "waiting": len(scheduler.waiting)}


def updating(engine: Engine) -> bool:
    """A weight update is open: the engine steps nothing until it commits or aborts."""
    return engine.weights.txn is not None


def weights_state(engine: Engine) -> str:
    """"updating" (an update is open), "incomplete" (discarded, or a broken update: an update
    fills them), "released" (backed up off the device) or "complete"."""
    if engine.weights.txn is not None:
        return "updating"
    if engine.weights.broken is not None:
        return "incomplete"
    return "released" if engine.memory_stats()["released"]["weights"] else "complete"


def named_weights(engine: Engine) -> list[tuple[str, torch.Tensor]]:
    """The weights as a trainer names them (views into the engine's parameters, no copy); what
    `weights_checksum()` digests, so another engine loaded from these has the same checksum."""
    store = engine.weights
    return [(name, store.targets[name].view()) for name in store.canonical]


def weights_manifest(engine: Engine) -> tuple[list[TensorMeta], list[str]]:
    """What a complete update must carry, in the engine's dtype (names, dtypes, shapes), and
    the other names the engine accepts for the same storage (a tied `lm_head.weight`)."""
    store = engine.weights
    manifest = [TensorMeta(name, dtype_name(store.targets[name].param.dtype),
                           store.targets[name].shape) for name in store.canonical]
    aliases = sorted(set(store.targets) - set(store.canonical))
    return manifest, aliases
