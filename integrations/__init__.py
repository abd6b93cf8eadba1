"""Adapters from the engine to the outside world, over the public `rollout.Engine` API: `http`
serves SGLang's native API and the OpenAI API (`rollout serve`), `ray` runs engines as Ray
actors and groups (and `ray.data` batch rollouts), `verl` is a verl rollout plugin. Nothing in
rollout/, kernels/ or weight_sync/ imports this."""
