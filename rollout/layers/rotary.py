import math
import weakref

import torch
from torch import nn

from kernels import Ops


def inverse_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """The same float32 values transformers computes for these RoPE parameters."""
    base = rope["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed elementwise exactly as transformers does."""

    def __init__(self, ops: Ops, head_dim: int, max_positions: int, rope: dict,
                 dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        inv_freq = inverse_frequencies(head_dim, rope)
        freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)
        self._last = (lambda: None, None, None)  # (weakref to positions, cos, sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, kv_heads, D]."""
        cos, sin = self._tables(positions)
        return self.ops.rotate(q, cos, sin), self.ops.rotate(k, cos, sin)

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] at `positions`, looked up once per forward (every layer passes
        the same tensor)."""
        if self._last[0]() is not positions:
            self._last = (weakref.ref(positions), self.cos[positions].unsqueeze(1),
                          self.sin[positions].unsqueeze(1))
        return self._last[1], self._last[2]
