"""Adapters from the engine to the outside world, over the public `rollout.Engine` API: `ray`
(engine actors, engine groups, `ray.data` batch rollouts) and `verl` (a rollout plugin).
Nothing in rollout/, kernels/ or weight_sync/ imports this package."""
