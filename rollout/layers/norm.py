import torch
from torch import nn

from kernels import Ops


class RMSNorm(nn.Module):
    def __init__(self, ops: Ops, size: int, eps: float):
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)
