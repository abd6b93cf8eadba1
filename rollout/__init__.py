"""A deterministic rollout engine for RL post-training."""

from rollout.engine import Engine
from rollout.outputs import CompletionOutput, RequestOutput
from rollout.sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput", "CompletionOutput"]
