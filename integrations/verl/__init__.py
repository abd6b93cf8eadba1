"""A verl (0.9.x) rollout plugin: verl drives this engine through its own extension points,
with no change to verl.

    VERL_USE_EXTERNAL_MODULES=integrations.verl python -m verl.trainer.main_ppo \\
        actor_rollout_ref.rollout.name=rollout_engine ...

Importing this module registers, under the name "rollout_engine", a `BaseRollout` (the
trainer-side adapter: resume, release, update_weights) and a `RolloutReplica` whose server actor
answers verl's token-in/token-out `generate`. Nothing outside this package imports verl.
"""

from integrations.verl.names import NAME

__all__ = ["NAME", "register"]


def register() -> None:
    """Make `get_rollout_class(NAME)` and `get_rollout_replica_class(NAME)` return ours."""
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry
    _ROLLOUT_REGISTRY[(NAME, "async")] = "integrations.verl.adapter.RolloutEngineAdapter"
    RolloutReplicaRegistry.register(NAME, _replica_class)


def _replica_class():
    from integrations.verl.replica import RolloutEngineReplica
    return RolloutEngineReplica


register()
