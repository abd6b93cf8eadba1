"""A deterministic rollout engine for RL post-training.

The names below load on first use, so a submodule (for example the vLLM side of `rollout
bench`, run in vLLM's own environment) imports without the engine's dependencies."""

_EXPORTS = {"Engine": "rollout.engine", "SamplingParams": "rollout.sampling_params",
            "RequestOutput": "rollout.outputs", "CompletionOutput": "rollout.outputs"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rollout' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_EXPORTS[name]), name)
