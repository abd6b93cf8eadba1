"""Adapters from the engine to the outside world: `http` serves SGLang's native API and the
OpenAI API (`rollout serve`). Nothing in rollout/, kernels/ or weight_sync/ imports this."""
