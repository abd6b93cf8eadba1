import torch
from torch import nn

from kernels import Ops


class Linear(nn.Module):
    """y = x W^T + b. A fused layer lists its parts in `splits` (output rows of each part):
    checkpoints load part by part, the deterministic kernel computes part by part, and the
    layer returns the parts (a list of tensors)."""

    def __init__(self, ops: Ops, in_features: int, splits: tuple[int, ...], bias: bool):
        super().__init__()
        self.ops = ops
        self.splits = splits if len(splits) > 1 else None
        out_features = sum(splits)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.ops.linear(x, self.weight, self.bias, self.splits)
