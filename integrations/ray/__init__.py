"""The engine on Ray: `RolloutActor` (one engine as an async actor), `RolloutGroup` (engines
behind one object, across nodes), `BatchRollout` (a `ray.data` batch rollout)."""

from integrations.ray.actor import EngineActor, RolloutActor
from integrations.ray.data import BatchRollout
from integrations.ray.group import NoEngineLeftError, RolloutGroup

__all__ = ["EngineActor", "RolloutActor", "RolloutGroup", "NoEngineLeftError", "BatchRollout"]
